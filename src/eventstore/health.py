"""Health: one readiness state shared by `/health/ready` and `grpc.health.v1.Health`.

A background task checks the database every HEALTH_CHECK_INTERVAL_MS (it answers, and every
migration is applied), on one kept connection, and records the result; shutting down marks
the server as draining.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
import trio
from psycopg.rows import TupleRow
from purerpc.grpclib.events import RequestReceived

from eventstore.db.connection import connect
from eventstore.db.migrations import pending_migrations
from eventstore.errors import InvalidArgument, NotFound
from eventstore.grpc.transport import Method

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
# grpc.health.v1.HealthCheckResponse.ServingStatus
SERVING = 1
NOT_SERVING = 2
SERVICE_UNKNOWN = 3
KNOWN_SERVICES = ("", "eventstore.v1.EventStoreService")


@dataclass
class Readiness:
    database: bool = False
    migrations: bool = False
    draining: bool = False
    reason: str = "starting"

    @property
    def ready(self) -> bool:
        return self.database and self.migrations and not self.draining


class Health:
    def __init__(self, url: str, interval: float) -> None:
        self._url = url
        self._interval = interval
        self.state = Readiness()
        self._changed = trio.Event()
        # One connection, kept between checks (a new one every interval costs PostgreSQL a
        # backend process each time); dropped on any error, so a check after an outage
        # reconnects.
        self._conn: psycopg.Connection[TupleRow] | None = None

    def _set(self, state: Readiness) -> None:
        if state.ready != self.state.ready:
            log.log(logging.INFO if state.ready else logging.WARNING,
                    "ready" if state.ready else "not ready", extra={"reason": state.reason})
        self.state = state
        self._changed.set()
        self._changed = trio.Event()

    def drain(self) -> None:
        """The server is shutting down: not ready from now on."""
        self._set(Readiness(self.state.database, self.state.migrations, True, "draining"))

    def _check(self) -> Readiness:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._url, autocommit=True, connect_timeout=2,
                                     statement_timeout_ms=2000)
            self._conn.execute("SELECT 1")
            pending = pending_migrations(self._conn)
        except Exception as exc:
            self._close()
            return Readiness(False, False, self.state.draining,
                             f"database unreachable: {type(exc).__name__}")
        if pending:
            names = ", ".join(f"{m.version:03d}_{m.name}" for m in pending)
            return Readiness(True, False, self.state.draining, f"migrations pending: {names}")
        return Readiness(True, True, self.state.draining,
                         "draining" if self.state.draining else "ok")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:
                log.debug("closing the health check's connection: %s", type(exc).__name__)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self._set(await trio.to_thread.run_sync(self._check))
            task_status.started()
            while True:
                await trio.sleep(self._interval)
                self._set(await trio.to_thread.run_sync(self._check))
        finally:
            self._close()

    # -- grpc.health.v1.Health ------------------------------------------------------------

    def serving_status(self, service: str) -> int:
        if service not in KNOWN_SERVICES:
            return SERVICE_UNKNOWN
        return SERVING if self.state.ready else NOT_SERVING

    def methods(self) -> dict[str, Method]:
        # Public: load balancers probe without credentials.
        return {f"{HEALTH_SERVICE}/Check": Method(unary=self._grpc_check, public=True),
                f"{HEALTH_SERVICE}/Watch": Method(stream=self._grpc_watch, public=True)}

    async def _grpc_check(self, raw: bytes, request: RequestReceived) -> bytes:
        # The health checking protocol: Check of a service the server does not know ends
        # NOT_FOUND (Watch sends SERVICE_UNKNOWN instead, and goes on).
        service = _service_name(raw)
        status = self.serving_status(service)
        if status == SERVICE_UNKNOWN:
            raise NotFound(f'service: "{service[:64]}" is not served here')
        return _status_message(status)

    async def _grpc_watch(self, raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        service = _service_name(raw)
        last = None
        while True:
            status = self.serving_status(service)
            if status != last:
                yield _status_message(status)
                last = status
            # Also wake now and then, so a client that went away is noticed.
            with trio.move_on_after(2.0):
                await self._changed.wait()


def _status_message(status: int) -> bytes:
    return bytes([0x08, status])  # HealthCheckResponse { ServingStatus status = 1; }


def _service_name(raw: bytes) -> str:
    """HealthCheckRequest { string service = 1; } — the only field, so decoding is short."""
    if not raw:
        return ""
    if raw[0] != 0x0A:
        raise InvalidArgument("request: not a valid HealthCheckRequest message")
    length, i, shift = 0, 1, 0
    while i < len(raw):
        byte = raw[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            break
        shift += 7
    name = raw[i:i + length]
    if len(name) != length:
        raise InvalidArgument("request: not a valid HealthCheckRequest message")
    return name.decode(errors="replace")
