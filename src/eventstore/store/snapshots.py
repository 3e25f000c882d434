"""Snapshots: save, load, and the retention task.

A snapshot is a JSON document saved for a stream at one of its versions; GetEvents with
`include_snapshot` returns the latest one and the events after it (`eventstore.store.reader`).
Saving is idempotent per (stream, version); retention deletes snapshots older than the retention
period but always keeps each stream's latest one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import psycopg
import trio
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from eventstore import audit
from eventstore._es_codec import InvalidRequest, check_json
from eventstore.config import Settings
from eventstore.db.connection import APPLICATION_NAME, SESSION_OPTIONS, keepalives_for
from eventstore.db.errors import is_connection_error, to_domain
from eventstore.errors import (
    AlreadyExists,
    EventStoreError,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
)
from eventstore.metrics import Metrics
from eventstore.v1 import eventstore_pb2 as pb

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Conn = psycopg.Connection[TupleRow]

# Retention deletes in chunks so that no transaction holds many row locks for long.
RETENTION_CHUNK = 5_000


@dataclass(frozen=True)
class StoredSnapshot:
    snapshot_id: str
    stream_id: str
    stream_type: str
    version: int
    data: bytes
    created_at: datetime


def check_snapshot_data(data: bytes, limit: int) -> None:
    """A snapshot payload must be a JSON document within the size limit that PostgreSQL's
    jsonb accepts, by the rules event data is checked by (the Rust extension's: `1e400` is
    a jsonb number, `\\u0000` is refused here rather than by the database)."""
    if not data:
        raise InvalidArgument("data: required (a JSON document)")
    if len(data) > limit:
        raise LimitExceeded(f"data: {len(data)} bytes, over the limit of {limit}")
    try:
        check_json(data)
    except InvalidRequest as exc:
        raise InvalidArgument(f"data: invalid JSON: {exc}") from None


def latest_snapshot(conn: Conn, stream_id: str, stream_type: str,
                    max_version: int | None) -> StoredSnapshot | None:
    """The stream's latest snapshot, or its latest at or below `max_version`."""
    row = conn.execute(
        "SELECT snapshot_id::text, version, data::text, created_at FROM snapshots"
        " WHERE stream_id = %s AND stream_type = %s AND version <= %s"
        " ORDER BY version DESC LIMIT 1",
        (stream_id, stream_type, max_version if max_version is not None else 2**63 - 1),
    ).fetchone()
    if row is None:
        return None
    return StoredSnapshot(row[0], stream_id, stream_type, int(row[1]), row[2].encode(), row[3])


def snapshot_message(snapshot: StoredSnapshot) -> pb.Snapshot:
    created = Timestamp()
    created.FromDatetime(snapshot.created_at)
    return pb.Snapshot(snapshot_id=snapshot.snapshot_id, stream_id=snapshot.stream_id,
                       stream_type=snapshot.stream_type, version=snapshot.version,
                       data=snapshot.data, created_at=created)


class Snapshots:
    """Snapshot storage on its own small pool of writable connections."""

    def __init__(self, url: str, settings: Settings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        options = f"{SESSION_OPTIONS} -c statement_timeout={settings.statement_timeout_ms}"
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            url, min_size=1, max_size=2, open=False, name="eventstore-snapshots",
            kwargs={"application_name": APPLICATION_NAME, "options": options,
                    "connect_timeout": 5, **keepalives_for(url)},
        )
        self._limiter = trio.CapacityLimiter(2)

    def open(self) -> None:
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close()

    async def _run(self, what: str, work: Callable[[Conn], _T]) -> _T:
        def attempt() -> _T:
            for attempt_no in range(3):
                try:
                    with self._pool.connection(timeout=3.0) as conn:
                        return work(conn)
                except PoolTimeout as exc:
                    raise to_domain(exc, what=what) from exc
                except Exception as exc:
                    # A broken pooled connection (database restarted) is discarded: try again.
                    if attempt_no < 2 and is_connection_error(exc):
                        continue
                    if isinstance(exc, EventStoreError):
                        raise
                    raise to_domain(exc, what=what) from exc
            raise AssertionError("unreachable")

        return await trio.to_thread.run_sync(attempt, limiter=self._limiter)

    async def save(self, stream_id: str, stream_type: str, version: int,
                   data: bytes) -> StoredSnapshot:
        """Save a snapshot; saving the same version again with equal data (as JSON values)
        returns the first save. Raises FailedPrecondition beyond the stream's version,
        AlreadyExists for the same version with other data."""
        saved = await self._run("saving a snapshot", lambda conn: self._save(
            conn, stream_id, stream_type, version, data))
        if self._metrics is not None:
            self._metrics.snapshots_saved.inc()
        return saved

    async def latest(self, stream_id: str, stream_type: str,
                     max_version: int | None) -> StoredSnapshot | None:
        return await self._run("reading a snapshot", lambda conn: latest_snapshot(
            conn, stream_id, stream_type, max_version))

    async def delete_expired(self, retention_days: int) -> int:
        """Delete snapshots older than `retention_days`, keeping each stream's latest one;
        return how many were deleted."""
        deleted = await self._run("deleting old snapshots",
                                  lambda conn: self._delete_expired(conn, retention_days))
        if self._metrics is not None:
            self._metrics.snapshots_deleted.inc(deleted)
        return deleted

    @staticmethod
    def _save(conn: Conn, stream_id: str, stream_type: str, version: int,
              data: bytes) -> StoredSnapshot:
        text = data.decode()
        with conn.transaction():
            row = conn.execute(
                "SELECT version FROM event_streams WHERE stream_id = %s AND stream_type = %s",
                (stream_id, stream_type),
            ).fetchone()
            current = int(row[0]) if row else 0
            if version > current:
                raise FailedPrecondition(
                    f"version: {version} is beyond the stream's version {current}")
            inserted = conn.execute(
                "INSERT INTO snapshots (snapshot_id, stream_id, stream_type, version, data,"
                " created_at) VALUES (gen_random_uuid(), %s, %s, %s, %s::jsonb, now())"
                " ON CONFLICT (stream_id, stream_type, version) DO NOTHING"
                " RETURNING snapshot_id::text, data::text, created_at",
                (stream_id, stream_type, version, text),
            ).fetchone()
            if inserted is not None:
                return StoredSnapshot(inserted[0], stream_id, stream_type, version,
                                      inserted[1].encode(), inserted[2])
            existing = conn.execute(
                "SELECT snapshot_id::text, data::text, created_at, data = %s::jsonb"
                " FROM snapshots WHERE stream_id = %s AND stream_type = %s AND version = %s",
                (text, stream_id, stream_type, version),
            ).fetchone()
        if existing is None:  # deleted between the two statements: vanishingly rare
            raise AlreadyExists(f"version: a snapshot at version {version} changed; retry")
        if not existing[3]:
            raise AlreadyExists(
                f"version: a snapshot at version {version} is already saved with other data")
        return StoredSnapshot(existing[0], stream_id, stream_type, version,
                              existing[1].encode(), existing[2])

    @staticmethod
    def _delete_expired(conn: Conn, retention_days: int) -> int:
        total = 0
        while True:
            with conn.transaction():
                cur = conn.execute(
                    "DELETE FROM snapshots WHERE snapshot_id IN ("
                    " SELECT s.snapshot_id FROM snapshots s"
                    " WHERE s.created_at < now() - make_interval(days => %s)"
                    " AND EXISTS (SELECT 1 FROM snapshots n WHERE n.stream_id = s.stream_id"
                    " AND n.stream_type = s.stream_type AND n.version > s.version)"
                    " LIMIT %s)",
                    (retention_days, RETENTION_CHUNK),
                )
                deleted = cur.rowcount
            total += deleted
            if deleted < RETENTION_CHUNK:
                return total


async def run_retention(snapshots: Snapshots, settings: Settings, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Every SNAPSHOT_RETENTION_INTERVAL_SECONDS, delete expired snapshots (logged)."""
    task_status.started()
    while True:
        started = time.perf_counter()
        try:
            deleted = await snapshots.delete_expired(settings.snapshot_retention_days)
        except Exception as exc:
            log.warning("snapshot retention failed: %s", exc)
        else:
            if deleted:
                audit.record("snapshot_delete", caller="retention", outcome="ok",
                             seconds=time.perf_counter() - started, deleted=deleted,
                             retention_days=settings.snapshot_retention_days)
        await trio.sleep(settings.snapshot_retention_interval_seconds)
