"""The server: one nursery that runs the writer, the readers' pool and the gRPC listener."""

from __future__ import annotations

import functools
import logging
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import msgspec
import trio

from eventstore import audit
from eventstore.auth.authenticator import Authenticator
from eventstore.auth.tls import server_context
from eventstore.backup import (
    archive_now,
    archiver_status,
    backup_path,
    disable_archiving,
    enable_archiving,
    run_backups,
)
from eventstore.config import Settings, listen_host
from eventstore.db.connection import connect
from eventstore.db.migrations import apply_migrations
from eventstore.embedded import EmbeddedPostgres
from eventstore.errors import EventStoreError
from eventstore.grpc.service import EventStoreService
from eventstore.grpc.transport import GrpcServer
from eventstore.health import Health
from eventstore.http import OperationsApp, serve_http
from eventstore.metrics import Metrics
from eventstore.store.peers import Peers
from eventstore.store.reader import Reader
from eventstore.store.snapshots import Snapshots, run_retention
from eventstore.store.subscriptions import LiveFeed, listen_for_commits
from eventstore.store.writer import AppendWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerInfo:
    """What `serve` reports once it is listening."""

    port: int
    database_url: str
    # The live feed (tests and metrics look at its window and subscriber count).
    feed: LiveFeed | None = None
    http_port: int | None = None


def start_embedded(settings: Settings) -> EmbeddedPostgres:
    data_dir = Path(settings.eventstore_data_dir).expanduser() / "pgdata"
    pg = EmbeddedPostgres(data_dir)
    log.info("embedded PostgreSQL running (DATABASE_URL is unset)",
             extra={"data_dir": str(pg.data_dir)})
    return pg


def is_standby(url: str) -> bool:
    """Whether the database is a hot standby (a read replica)."""
    with connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def migrate(url: str) -> list[str]:
    """Apply pending migrations; return the names applied."""
    with connect(url, autocommit=True) as conn:
        return [f"{m.version:03d}_{m.name}" for m in apply_migrations(conn)]


# After in-flight appends are answered and every subscription has ended, how long the last
# replies and the subscriptions' UNAVAILABLE endings get to reach their clients.
FLUSH_SECONDS = 0.5
# How long the GOAWAYs get before the connections close.
GOAWAY_SECONDS = 0.05
# A read replica's server polls for new commits this often at most (LIVE_POLL_MS if less).
STANDBY_POLL_MS = 100
# At a graceful stop with BACKUP_DIR set, how long the embedded PostgreSQL gets to archive
# the WAL segment it was writing.
ARCHIVE_AT_STOP_SECONDS = 10.0


async def serve(settings: Settings, *, shutdown: trio.Event | None = None,
                task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the service until cancelled, or until `shutdown` is set (then it reports not ready
    and subscriptions end with UNAVAILABLE first). Reports `ServerInfo` once both ports are
    bound."""
    url = settings.database_url
    embedded: EmbeddedPostgres | None = None
    if url is None:
        embedded = await trio.to_thread.run_sync(start_embedded, settings)
        url = embedded.url()
    standby = await trio.to_thread.run_sync(is_standby, url)
    if standby:
        # A read replica: it gets the schema (and its migrations) from its primary.
        log.warning("the database is a standby (read replica): serving reads and "
                    "subscriptions only; appends and snapshot saves answer UNAVAILABLE")
    else:
        applied = await trio.to_thread.run_sync(migrate, url)
        if applied:
            log.info("migrations applied", extra={"migrations": applied})
    backup_dir = (await trio.to_thread.run_sync(backup_path, settings.backup_dir)
                  if settings.backup_dir else None)
    archiving = backup_dir is not None and embedded is not None and not standby
    # Whether the archive starts now (a base backup is then needed at once: the archive
    # continues no older one).
    archive_started = False
    if embedded is not None and not standby:
        if backup_dir is not None:
            restart = await trio.to_thread.run_sync(enable_archiving, url, embedded.data_dir,
                                                    backup_dir)
            archive_started = restart
            why = "it archives its WAL into BACKUP_DIR from now on"
        else:
            restart = await trio.to_thread.run_sync(disable_archiving, url)
            why = "BACKUP_DIR is unset: it stops archiving its WAL"
        if restart:
            log.info(f"restarting the embedded PostgreSQL: {why}")
            await trio.to_thread.run_sync(embedded.stop)
            await trio.to_thread.run_sync(embedded.start)
    if backup_dir is not None and embedded is None:
        log.info("base backups only: recovery to any moment needs the database's own WAL "
                 "archive (README, Backup and recovery)", extra={"backup_dir": str(backup_dir)})
    ssl_context = server_context(settings)
    authenticator = Authenticator(settings.api_keys_file,
                                  client_certificates=settings.tls_client_ca_file is not None,
                                  reload_seconds=settings.api_keys_reload_ms / 1000)
    host = listen_host(settings.host, authenticator.mode)
    if authenticator.mode == "open":
        log.warning("NO AUTHENTICATION: neither API_KEYS_FILE nor TLS_CLIENT_CA_FILE is set, "
                    "so every caller may read and write everything (local development only)"
                    + ("; listening on loopback only (set HOST to listen elsewhere)"
                       if settings.host is None else ""))
    else:
        log.info("authentication on", extra={"authentication": authenticator.mode,
                                             "api_keys": authenticator.key_count})
    if ssl_context is None:
        log.warning("the gRPC port speaks plaintext (TLS_CERT_FILE is unset)")
    metrics = Metrics()
    writer = AppendWriter(url, settings, metrics)
    reader = Reader(url, settings, metrics)
    reader.open()
    snapshots = Snapshots(url, settings, metrics)
    snapshots.open()
    try:
        # A standby hears of no commit (no NOTIFY there): its feed polls, often.
        feed = LiveFeed(reader, msgspec.structs.replace(
            settings, live_poll_ms=min(settings.live_poll_ms, STANDBY_POLL_MS))
            if standby else settings)
        health = Health(url, settings.health_check_interval_ms / 1000)

        def committed(first: int, last: int, count: int, rows: bytes | None) -> None:
            feed.committed(first, last, rows)
            metrics.events_appended.inc(count)
            metrics.batch_events.observe(count)

        writer.add_listener(committed)
        # While someone subscribes, the writer reads its small commits back for the feed.
        writer.rows_wanted = lambda: feed.subscribers > 0
        # Commits are announced to other server processes only while there are any.
        peers = Peers()
        writer.notify_peers = peers.present
        writes_refused = None
        if standby:
            writes_refused = ("this server reads from a standby database (a read replica): "
                              "nothing was written; write through a server of the primary")
            writer.refuse_writes(writes_refused)
        service = EventStoreService(settings, writer, reader, feed, snapshots,
                                    writes_refused=writes_refused)
        grpc_server = GrpcServer(
            {**service.methods(), **health.methods()},
            max_request_bytes=settings.max_request_bytes,
            request_seconds=settings.request_read_seconds,
            observe=metrics.observe_grpc,
            authenticate=authenticator.authenticate,
            refused=audit.refused,
        )

        async def refresh_gauges() -> None:
            metrics.subscriptions_open.set(feed.subscribers)
            window = feed.window
            metrics.live_window_events.set(len(window) if window is not None else 0)
            metrics.subscriber_lag.set(feed.lag())
            metrics.database_up.set(1 if health.state.database else 0)
            if archiving:
                try:
                    failures, last = await trio.to_thread.run_sync(archiver_status, url)
                except Exception as exc:
                    log.debug("reading the WAL archiver's state failed: %s", exc)
                else:
                    metrics.wal_archive_failures.set(failures)
                    metrics.wal_archive_last_success.set(last)
            try:
                events, streams, snaps = await reader.table_sizes()
            except EventStoreError:
                return
            metrics.events.set(events)
            metrics.streams.set(streams)
            metrics.snapshots.set(snaps)

        http_app = OperationsApp(health, metrics, refresh_gauges,
                                 authentication=authenticator.mode, tls=ssl_context is not None,
                                 standby=standby)
        async with trio.open_nursery() as nursery:
            await nursery.start(health.run)
            await nursery.start(authenticator.run)
            if not standby:
                await nursery.start(writer.run)
            await nursery.start(feed.run)
            if not standby:  # LISTEN is not allowed on a standby; nor are writes
                await nursery.start(listen_for_commits, url, feed, lambda: writer.backend_pid,
                                    peers)
                await nursery.start(run_retention, snapshots, settings)
            if backup_dir is not None:
                await nursery.start(functools.partial(
                    run_backups, url, backup_dir, timedelta(hours=settings.backup_interval_hours),
                    settings.backup_keep, metrics, now_first=archive_started))
            http_port = await nursery.start(serve_http, http_app, host,
                                            settings.http_port)
            port = await nursery.start(grpc_server.serve, host, settings.port, ssl_context)
            log.info("eventstore listening", extra={"host": host, "grpc_port": port,
                                                    "http_port": http_port})
            task_status.started(ServerInfo(port=port, database_url=url, feed=feed,
                                           http_port=http_port))
            if shutdown is not None:
                await shutdown.wait()
                log.info("shutting down")
                health.drain()
                feed.close()
                # In-flight appends get their true outcome; new ones are refused.
                with trio.move_on_after(settings.shutdown_grace_seconds) as grace:
                    await writer.drain()
                    # Each subscription ends with UNAVAILABLE once it sees the feed closed;
                    # one whose client stopped reading (its reply blocked by HTTP/2 flow
                    # control) sees it when the client reads again, or not within the grace.
                    await feed.ended()
                    await trio.sleep(FLUSH_SECONDS)
                if grace.cancelled_caught:
                    log.warning("shutdown grace period over; stopping what is left")
                # The connections end on purpose: GOAWAY (NO_ERROR) says which calls were
                # taken, so a client knows a later one was not and may retry it elsewhere. Not
                # before the replies have left: h2-based clients (purerpc's, ours) end the
                # connection at a GOAWAY and fail the calls still open on it — an append
                # answered by the writer whose reply was still to be sent, too.
                grpc_server.go_away()
                await trio.sleep(GOAWAY_SECONDS)
                if archiving:
                    # The archive gets the last commits too (PostgreSQL archives a segment
                    # once it is full, or ARCHIVE_TIMEOUT_SECONDS after it was written to).
                    with trio.move_on_after(ARCHIVE_AT_STOP_SECONDS + 5):
                        if not await trio.to_thread.run_sync(
                                archive_now, url, ARCHIVE_AT_STOP_SECONDS,
                                abandon_on_cancel=True):
                            log.warning("the last WAL segment was not archived in time")
                nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(reader.close)
        await trio.to_thread.run_sync(snapshots.close)


async def serve_until_signalled(settings: Settings) -> None:
    """`serve`, stopped by SIGTERM or SIGINT."""
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    shutdown.set()
                    return

            nursery.start_soon(on_signal)
            await serve(settings, shutdown=shutdown)
            nursery.cancel_scope.cancel()
