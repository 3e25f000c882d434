"""EventStoreClient: the eventstore.v1 API for Trio programs, over purerpc."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio
from google.protobuf.message import Message

from eventstore.client import _convert as convert
from eventstore.client._subscription import Subscription, SubscriptionRequest
from eventstore.client._transport import Connection, Metadata
from eventstore.client.errors import DeadlineExceeded, InternalError, Unavailable, translating
from eventstore.client.models import (
    AppendResult,
    ExpectedVersion,
    NewEvent,
    ReconnectPolicy,
    RecordedEvent,
    SavedSnapshot,
    Snapshot,
)
from eventstore.v1 import eventstore_pb2 as pb


class EventStoreClient:
    """A client of one eventstore server. Create it with `EventStoreClient.connect`:

        async with EventStoreClient.connect("127.0.0.1", 50051) as client:
            await client.append_events(stream_id, "VocabularyItem", [NewEvent("WordAdded", {})])

    Connecting is lazy: the first call dials, and a call after a lost connection dials again
    (a call in flight when the connection is lost fails with `Unavailable`; reads are safe to
    retry, appends too when they carry event ids). Unary calls share one HTTP/2 connection;
    each subscription has a connection of its own, so a slow subscriber never holds up other
    calls and closing it closes its connection. Every call sends `authorization: Bearer
    <api_key>` when an API key is given; `tls` is an SSLContext whose ALPN protocols include
    "h2" (see `tls_context`). `timeout` (seconds) bounds every unary call, dialing included,
    and raises `DeadlineExceeded`; it is enforced by the client (no grpc-timeout header).
    Dialing alone gives up after `ReconnectPolicy.connect_timeout` (10 s by default) with
    `Unavailable`.
    """

    def __init__(self, nursery: trio.Nursery, host: str, port: int, *,
                 tls: ssl.SSLContext | None, api_key: str | None, timeout: float | None,
                 reconnect: ReconnectPolicy, keepalive: float | None = 10.0) -> None:
        """Use `EventStoreClient.connect`."""
        _check_options(api_key, timeout, keepalive)
        self._nursery = nursery
        self._keepalive = keepalive
        self.host = host
        self.port = port
        self.target = f"{host}:{port}"
        self._tls = tls
        self._metadata: Metadata = (
            (("authorization", f"Bearer {api_key}"),) if api_key is not None else ())
        self._timeout = timeout
        self.reconnect_policy = reconnect
        self._shared: Connection | None = None
        self._dial_lock = trio.Lock()
        self._closed = False
        self._connections: set[Connection] = set()

    @classmethod
    @asynccontextmanager
    async def connect(cls, host: str = "127.0.0.1", port: int = 50051, *,
                      tls: ssl.SSLContext | None = None, api_key: str | None = None,
                      # The default deadline of each call the client makes, not this one's.
                      timeout: float | None = None,  # noqa: ASYNC109
                      reconnect: ReconnectPolicy | None = None,
                      keepalive: float | None = 10.0,
                      ) -> AsyncIterator[EventStoreClient]:
        """A client for the server at host:port, closed (with its connections and
        subscriptions) when the block ends. `reconnect` is the subscriptions' default
        `ReconnectPolicy`. While calls are open on a connection and nothing has arrived on it
        for `keepalive` seconds, the client pings the server; no answer within another
        `keepalive` seconds ends the connection (its calls raise `Unavailable`). None turns
        that off."""
        _check_options(api_key, timeout, keepalive)
        body_error: Exception | None = None
        async with trio.open_nursery() as nursery:
            client = cls(nursery, host, port, tls=tls, api_key=api_key, timeout=timeout,
                         reconnect=reconnect or ReconnectPolicy(), keepalive=keepalive)
            try:
                yield client
            except Exception as exc:
                # Re-raised below, outside the nursery, so the caller sees it as it is
                # rather than wrapped in an ExceptionGroup.
                body_error = exc
            finally:
                client._close()
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    @property
    def closed(self) -> bool:
        return self._closed

    def _close(self) -> None:
        self._closed = True
        for connection in list(self._connections):
            connection.close()

    # -- connections -------------------------------------------------------------------------

    async def _dial(self, connect_timeout: float) -> Connection:
        """A new connection, run in the client's nursery (errors: see `translating`; no
        connection within `connect_timeout` seconds: `Unavailable`)."""
        if self._closed:
            raise RuntimeError("the EventStoreClient is closed")
        connection = Connection(self.host, self.port, self._tls, keepalive=self._keepalive)
        with trio.move_on_after(connect_timeout), translating(self.target):
            await self._nursery.start(self._run_connection, connection)
            return connection
        raise Unavailable(f"cannot connect to {self.target} within {connect_timeout:g} s")

    async def _run_connection(self, connection: Connection, *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                              ) -> None:
        self._connections.add(connection)
        try:
            await connection.run(task_status=task_status)
        finally:
            self._connections.discard(connection)

    async def _shared_connection(self) -> Connection:
        async with self._dial_lock:
            if self._shared is None or not self._shared.usable:
                self._shared = await self._dial(self.reconnect_policy.connect_timeout)
            return self._shared

    @contextmanager
    def _deadline(self, what: str) -> Iterator[None]:
        if self._timeout is None:
            yield
            return
        with trio.move_on_after(self._timeout) as scope:
            yield
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"{what}: no answer from {self.target} within "
                                   f"{self._timeout:g} s")

    async def _call(self, method: str, request: Message, response_type: type[Message]) -> Any:
        with self._deadline(method), translating(self.target):
            connection = await self._shared_connection()
            return await connection.unary(method, request, response_type, self._metadata)

    # -- unary RPCs --------------------------------------------------------------------------

    async def append_events(self, stream_id: str | uuid.UUID, stream_type: str,
                            events: Sequence[NewEvent], *,
                            expected_version: int | ExpectedVersion | None = None,
                            ) -> AppendResult:
        """Append `events` to a stream, atomically.

        `expected_version`: None or `ExpectedVersion.ANY` (any version), 0 or
        `ExpectedVersion.NO_STREAM` (the stream must not exist), N (its version must be N), -1
        or `ExpectedVersion.STREAM_EXISTS` (it must exist). A conflict raises
        `WrongExpectedVersion`; a retry with the same event ids returns the first result.
        """
        request = convert.append_request(stream_id, stream_type, events, expected_version)
        reply = await self._call("AppendEvents", request, pb.AppendEventsResponse)
        return convert.append_result(reply)

    async def get_events(self, stream_id: str | uuid.UUID, stream_type: str, *,
                         from_version: int = 0, to_version: int | None = None,
                         page_size: int = 0) -> AsyncIterator[RecordedEvent]:
        """A stream's events from `from_version` to `to_version` (both inclusive; None: to
        the end), in version order, fetched `page_size` at a time (0: the server's default).
        A stream that does not exist has no events."""
        version = from_version
        while True:
            request = pb.GetEventsRequest(stream_id=convert.uuid_text(stream_id),
                                          stream_type=stream_type, from_version=version,
                                          max_count=page_size)
            if to_version is not None:
                request.to_version = to_version
            reply = await self._call("GetEvents", request, pb.GetEventsResponse)
            for event in reply.events:
                yield convert.recorded_event(event)
            if not reply.has_more:
                return
            if reply.next_from_version <= version:
                raise InternalError("GetEvents: next_from_version does not advance")
            version = reply.next_from_version

    async def read_all(self, *, from_position: int = 0, stream_types: Sequence[str] = (),
                       event_type_prefixes: Sequence[str] = (), page_size: int = 0,
                       ) -> AsyncIterator[RecordedEvent]:
        """Every event after `from_position` (exclusive) in global order, optionally only of
        `stream_types` (exact) and/or with an event type starting with one of
        `event_type_prefixes`; fetched `page_size` at a time (0: the server's default)."""
        position = from_position
        event_filter = pb.Filter(stream_types=list(stream_types),
                                 event_type_prefixes=list(event_type_prefixes))
        while True:
            request = pb.ReadAllRequest(from_position=position, max_count=page_size,
                                        filter=event_filter)
            reply = await self._call("ReadAll", request, pb.ReadAllResponse)
            for event in reply.events:
                yield convert.recorded_event(event)
            if not reply.has_more:
                return
            if reply.next_from_position <= position:
                raise InternalError("ReadAll: next_from_position does not advance")
            position = reply.next_from_position

    async def get_snapshot(self, stream_id: str | uuid.UUID, stream_type: str, *,
                           max_version: int | None = None) -> Snapshot | None:
        """The stream's latest snapshot (at or below `max_version` when given), or None."""
        request = pb.GetSnapshotRequest(stream_id=convert.uuid_text(stream_id),
                                        stream_type=stream_type)
        if max_version is not None:
            request.max_version = max_version
        reply = await self._call("GetSnapshot", request, pb.GetSnapshotResponse)
        return convert.snapshot(reply.snapshot) if reply.found else None

    async def load_stream(self, stream_id: str | uuid.UUID, stream_type: str, *,
                          to_version: int | None = None, page_size: int = 0,
                          ) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """What an aggregate needs to rebuild its state: the latest snapshot (at or below
        `to_version` when given; None if there is none) and every event after it, in version
        order. The snapshot and the first page come from one consistent read."""
        snapshot: Snapshot | None = None
        events: list[RecordedEvent] = []
        version = 0
        first = True
        while True:
            request = pb.GetEventsRequest(stream_id=convert.uuid_text(stream_id),
                                          stream_type=stream_type, from_version=version,
                                          max_count=page_size, include_snapshot=first)
            if to_version is not None:
                request.to_version = to_version
            reply = await self._call("GetEvents", request, pb.GetEventsResponse)
            if first and reply.HasField("snapshot"):
                snapshot = convert.snapshot(reply.snapshot)
            first = False
            events.extend(convert.recorded_event(event) for event in reply.events)
            if not reply.has_more:
                return snapshot, events
            if reply.next_from_version <= version:
                raise InternalError("GetEvents: next_from_version does not advance")
            version = reply.next_from_version

    async def save_snapshot(self, stream_id: str | uuid.UUID, stream_type: str, version: int,
                            data: Any) -> SavedSnapshot:
        """Save the stream's state at `version` (`data`: JSON bytes, or a value for orjson)."""
        request = pb.SaveSnapshotRequest(stream_id=convert.uuid_text(stream_id),
                                         stream_type=stream_type, version=version,
                                         data=convert.json_bytes(data))
        reply = await self._call("SaveSnapshot", request, pb.SaveSnapshotResponse)
        return convert.saved_snapshot(reply)

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe_to_stream(self, stream_type: str, stream_id: str | uuid.UUID | None = None,
                            *, from_version: int = 0, from_position: int = 0,
                            include_existing: bool = True, max_batch_size: int = 0,
                            checkpoint_interval_ms: int = 0,
                            reconnect: ReconnectPolicy | None = None) -> Subscription:
        """Events of one stream (`stream_id` given: after `from_version`) or of every stream
        of `stream_type` (after `from_position`), then live; see `Subscription`."""
        request = SubscriptionRequest(
            method="SubscribeToStream", stream_type=stream_type,
            stream_id=None if stream_id is None else convert.uuid_text(stream_id),
            from_version=from_version, from_position=from_position,
            include_existing=include_existing, max_batch_size=max_batch_size,
            checkpoint_interval_ms=checkpoint_interval_ms)
        return Subscription(self, request, reconnect or self.reconnect_policy)

    def subscribe_to_all(self, *, from_position: int = 0, include_existing: bool = True,
                         stream_types: Sequence[str] = (), event_type_prefixes: Sequence[str] = (),
                         max_batch_size: int = 0, checkpoint_interval_ms: int = 0,
                         reconnect: ReconnectPolicy | None = None) -> Subscription:
        """Every event after `from_position` (optionally filtered as in `read_all`), then
        live; see `Subscription`."""
        request = SubscriptionRequest(
            method="SubscribeToAll", from_position=from_position,
            include_existing=include_existing, stream_types=tuple(stream_types),
            event_type_prefixes=tuple(event_type_prefixes), max_batch_size=max_batch_size,
            checkpoint_interval_ms=checkpoint_interval_ms)
        return Subscription(self, request, reconnect or self.reconnect_policy)


def _check_options(api_key: str | None, timeout: float | None, keepalive: float | None,
                   ) -> None:
    if keepalive is not None and keepalive <= 0:
        raise ValueError("keepalive must be positive (or None)")
    if api_key is not None and (not api_key or any(c in api_key for c in "\r\n\0")):
        raise ValueError("api_key must be non-empty and must not contain CR, LF or NUL")
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive (or None)")


def tls_context(*, cafile: str | None = None, certfile: str | None = None,
                keyfile: str | None = None) -> ssl.SSLContext:
    """An SSLContext for `EventStoreClient.connect(tls=...)`: verifies the server against
    `cafile` (default: the system's CAs), presents `certfile`/`keyfile` for mTLS when given,
    and offers ALPN "h2" (gRPC needs HTTP/2)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["h2"])
    return context
