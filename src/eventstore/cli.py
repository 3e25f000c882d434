"""The command line: `eventstore serve`, `eventstore migrate`."""

from __future__ import annotations

import sys

import click
import trio

from eventstore.config import ConfigError, Settings, load_settings
from eventstore.logs import configure_logging


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        click.echo(f"eventstore: invalid configuration: {exc}", err=True)
        sys.exit(2)


@click.group()
def main() -> None:
    """eventstore: an event store service for event-sourced microservices (gRPC)."""


@main.command()
@click.option("--log-format", type=click.Choice(["json", "text"]), default=None,
              help="Log as JSON lines (the default, LOG_FORMAT) or as text for people.")
def serve(log_format: str | None) -> None:
    """Start the gRPC server (configuration from the environment; see the README).

    With DATABASE_URL unset, an embedded PostgreSQL is started in EVENTSTORE_DATA_DIR.
    SIGTERM or SIGINT stops it gracefully (SHUTDOWN_GRACE_SECONDS).
    """
    settings = _settings()
    configure_logging(settings.log_level, log_format or settings.log_format)
    from eventstore.server import serve_until_signalled

    trio.run(serve_until_signalled, settings)


@main.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    from eventstore.server import migrate as apply
    from eventstore.server import start_embedded

    url = settings.database_url
    if url is None:
        url = start_embedded(settings).url()
    applied = apply(url)
    click.echo("applied: " + ", ".join(applied) if applied else "already up to date")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Server address.")
@click.option("--port", type=click.IntRange(1, 65535), envvar="PORT", default=50051,
              show_default=True, help="gRPC port (default: $PORT, else 50051).")
@click.option("--from-position", type=click.IntRange(min=0), default=0, show_default=True,
              help="Start after this global position.")
@click.option("--stream-type", "stream_types", multiple=True,
              help="Only this stream type (repeatable).")
@click.option("--event-type-prefix", "event_type_prefixes", multiple=True,
              help="Only event types starting with this (repeatable).")
@click.option("--no-existing", is_flag=True, help="Only events appended from now on.")
@click.option("--api-key", envvar="EVENTSTORE_API_KEY", default=None,
              help="API key (default: $EVENTSTORE_API_KEY).")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many events.")
def tail(host: str, port: int, from_position: int, stream_types: tuple[str, ...],
         event_type_prefixes: tuple[str, ...], no_existing: bool, api_key: str | None,
         count: int | None) -> None:
    """Print events as JSON lines, following the store live (until Ctrl-C or --count).

    Survives server restarts: the subscription resumes where it left off.
    """
    import os

    from eventstore.client import ClientError
    from eventstore.client._tail import tail as follow

    configure_logging("WARNING", "text")
    try:
        trio.run(lambda: follow(
            host, port, sys.stdout.buffer, from_position=from_position,
            stream_types=stream_types, event_type_prefixes=event_type_prefixes,
            include_existing=not no_existing, api_key=api_key, count=count))
    except ClientError as exc:
        click.echo(f"eventstore tail: {exc}", err=True)
        sys.exit(1)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`eventstore tail | head`): no complaint at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
