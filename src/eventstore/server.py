"""The server: one nursery that runs the writer, the readers' pool and the gRPC listener."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import trio

from eventstore.config import Settings
from eventstore.db.connection import connect
from eventstore.db.migrations import apply_migrations
from eventstore.embedded import EmbeddedPostgres
from eventstore.grpc.service import EventStoreService
from eventstore.grpc.transport import GrpcServer
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


def start_embedded(settings: Settings) -> EmbeddedPostgres:
    data_dir = Path(settings.eventstore_data_dir).expanduser() / "pgdata"
    pg = EmbeddedPostgres(data_dir)
    log.info("embedded PostgreSQL running (DATABASE_URL is unset)",
             extra={"data_dir": str(pg.data_dir)})
    return pg


def migrate(url: str) -> list[str]:
    """Apply pending migrations; return the names applied."""
    with connect(url, autocommit=True) as conn:
        return [f"{m.version:03d}_{m.name}" for m in apply_migrations(conn)]


# After a shutdown request, how long open subscriptions get to end with UNAVAILABLE.
SHUTDOWN_GRACE_SECONDS = 0.5


async def serve(settings: Settings, *, shutdown: trio.Event | None = None,
                task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the service until cancelled, or until `shutdown` is set (then subscriptions end
    with UNAVAILABLE first). Reports `ServerInfo` once the gRPC port is bound."""
    url = settings.database_url
    if url is None:
        embedded = await trio.to_thread.run_sync(start_embedded, settings)
        url = embedded.url()
    applied = await trio.to_thread.run_sync(migrate, url)
    if applied:
        log.info("migrations applied", extra={"migrations": applied})
    writer = AppendWriter(url, settings)
    reader = Reader(url, settings)
    reader.open()
    snapshots = Snapshots(url, settings)
    snapshots.open()
    try:
        feed = LiveFeed(reader, settings)
        writer.add_listener(lambda first, last, count: feed.wake())
        service = EventStoreService(settings, writer, reader, feed, snapshots)
        grpc_server = GrpcServer(service.methods(), max_request_bytes=settings.max_request_bytes)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await nursery.start(feed.run)
            await nursery.start(listen_for_commits, url, feed, lambda: writer.backend_pid)
            await nursery.start(run_retention, snapshots, settings)
            port = await nursery.start(grpc_server.serve, settings.host, settings.port)
            log.info("eventstore listening", extra={"grpc_port": port})
            task_status.started(ServerInfo(port=port, database_url=url, feed=feed))
            if shutdown is not None:
                await shutdown.wait()
                log.info("shutting down")
                feed.close()
                await trio.sleep(SHUTDOWN_GRACE_SECONDS)
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
