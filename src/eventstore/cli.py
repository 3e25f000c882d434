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
def serve() -> None:
    """Start the gRPC server (configuration from the environment; see the README).

    With DATABASE_URL unset, an embedded PostgreSQL is started in EVENTSTORE_DATA_DIR.
    """
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
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


if __name__ == "__main__":
    main()
