"""EventStoreService: decode a request, call the store, return the serialized reply."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import trio
from google.protobuf.message import DecodeError, Message
from purerpc.grpclib.events import RequestReceived

from eventstore import _es_codec as codec
from eventstore import audit
from eventstore.auth.principals import ANONYMOUS, Principal
from eventstore.config import Settings
from eventstore.errors import EventStoreError, InvalidArgument, LimitExceeded, Unavailable
from eventstore.grpc.transport import Method, after_reply
from eventstore.store.live import Selector
from eventstore.store.reader import Reader
from eventstore.store.snapshots import Snapshots, check_snapshot_data, snapshot_message
from eventstore.store.subscriptions import LiveFeed, SubscriptionSpec, subscribe
from eventstore.store.validation import (
    EventFilter,
    check_name,
    parse_filter,
    parse_position_range,
    parse_stream_range,
    parse_uuid,
)
from eventstore.store.writer import AppendWriter
from eventstore.v1 import eventstore_pb2 as pb

SERVICE_NAME = "eventstore.v1.EventStoreService"


def caller(request: RequestReceived) -> Principal:
    """Who is calling (set by the transport once the call's credentials are checked)."""
    principal = getattr(request, "principal", ANONYMOUS)
    assert isinstance(principal, Principal)
    return principal

_M = TypeVar("_M", bound=Message)


def decode(message_type: type[_M], raw: bytes) -> _M:
    message = message_type()
    try:
        message.ParseFromString(raw)
    except DecodeError:
        raise InvalidArgument(
            f"request: not a valid {message_type.DESCRIPTOR.name} message"
        ) from None
    return message


def parse_append(raw: bytes, settings: Settings,
                 caller: bytes | None = None) -> codec.AppendRequest:
    """Validate an AppendEventsRequest (in Rust) and translate its errors to the domain's.
    `caller` (JSON) is recorded in each event's metadata under `$eventstore.caller`."""
    try:
        return codec.AppendRequest.parse(
            raw, settings.max_events_per_request, settings.max_event_bytes, caller
        )
    except codec.RequestTooLarge as exc:
        raise LimitExceeded(str(exc)) from None
    except codec.InvalidRequest as exc:
        raise InvalidArgument(str(exc)) from None


def _audit_refused(operation: str) -> Callable[[RequestReceived, str, str, float], None]:
    """The audit line of a write the transport refused before its request could be read
    (over the size limit, not decompressible, too slow to arrive): who tried, and why."""
    def refused(request: RequestReceived, outcome: str, reason: str, seconds: float) -> None:
        audit.record(operation, **audit.caller_of(request), outcome=outcome, seconds=seconds,
                     stream_id=None, stream_type=None, reason=reason)
    return refused


class EventStoreService:
    def __init__(self, settings: Settings, writer: AppendWriter, reader: Reader,
                 feed: LiveFeed, snapshots: Snapshots, *,
                 writes_refused: str | None = None) -> None:
        self._settings = settings
        # Why snapshot saves are refused (UNAVAILABLE), if they are: a read replica's server.
        # (Its appends are refused by the writer.)
        self._writes_refused = writes_refused
        self._writer = writer
        self._reader = reader
        self._feed = feed
        self._snapshots = snapshots

    def methods(self) -> dict[str, Method]:
        prefix = SERVICE_NAME + "/"
        return {
            prefix + "AppendEvents": Method(unary=self.append_events,
                                            refused=_audit_refused("append")),
            prefix + "GetEvents": Method(unary=self.get_events),
            prefix + "ReadAll": Method(unary=self.read_all),
            prefix + "GetSnapshot": Method(unary=self.get_snapshot),
            prefix + "SaveSnapshot": Method(unary=self.save_snapshot,
                                            refused=_audit_refused("snapshot_save")),
            prefix + "SubscribeToStream": Method(stream=self.subscribe_to_stream),
            prefix + "SubscribeToAll": Method(stream=self.subscribe_to_all),
        }

    async def append_events(self, raw: bytes, request: RequestReceived) -> bytes:
        started = time.perf_counter()
        parsed: codec.AppendRequest | None = None
        principal = caller(request)
        try:
            parsed = parse_append(raw, self._settings, principal.caller_json)
            principal.check_write(parsed.stream_type)
            # Once queued, the append is committed whatever becomes of this call: its outcome
            # is awaited even when the call is cancelled (its connection ended), so that a
            # stored write always gets its audit line (see `AppendWriter.append`).
            reply = await self._writer.append(parsed)
        except EventStoreError as error:
            audit.record("append", **audit.caller_of(request),
                         outcome=type(error).__name__, seconds=time.perf_counter() - started,
                         stream_id=parsed.stream_id if parsed else None,
                         stream_type=parsed.stream_type if parsed else None,
                         event_count=parsed.event_count if parsed else None,
                         reason=error.message)
            raise
        # The success's audit line is written once the reply is on its way: the client does not
        # wait for it (a failure's line, above, is written before its status goes).
        seconds = time.perf_counter() - started
        stream_id, stream_type = parsed.stream_id, parsed.stream_type
        after_reply(request, lambda: audit.record(
            "append", **audit.caller_of(request), outcome="ok", seconds=seconds,
            stream_id=stream_id, stream_type=stream_type, **audit.append_fields(reply)))
        return reply

    async def get_events(self, raw: bytes, request: RequestReceived) -> bytes:
        msg = decode(pb.GetEventsRequest, raw)
        query = parse_stream_range(
            msg.stream_id,
            msg.stream_type,
            msg.from_version,
            msg.to_version if msg.HasField("to_version") else None,
            msg.max_count,
            msg.include_snapshot,
            default_page=self._settings.read_page_default,
            max_page=self._settings.read_page_max,
        )
        caller(request).check_read(query.stream_type)
        return await self._reader.get_events(query)

    async def read_all(self, raw: bytes, request: RequestReceived) -> bytes:
        msg = decode(pb.ReadAllRequest, raw)
        event_filter = parse_filter(msg.filter.stream_types, msg.filter.event_type_prefixes)
        query = parse_position_range(
            msg.from_position,
            msg.max_count,
            event_filter.restricted_to(caller(request).read_scope(event_filter.stream_types)),
            default_page=self._settings.read_page_default,
            max_page=self._settings.read_page_max,
        )
        return await self._reader.read_all(query)

    async def get_snapshot(self, raw: bytes, request: RequestReceived) -> bytes:
        msg = decode(pb.GetSnapshotRequest, raw)
        stream_id = parse_uuid("stream_id", msg.stream_id)
        stream_type = check_name("stream_type", msg.stream_type)
        max_version = msg.max_version if msg.HasField("max_version") else None
        if max_version is not None and max_version < 0:
            raise InvalidArgument(f"max_version: must not be negative, got {max_version}")
        caller(request).check_read(stream_type)
        snapshot = await self._snapshots.latest(stream_id, stream_type, max_version)
        reply = pb.GetSnapshotResponse(found=snapshot is not None)
        if snapshot is not None:
            reply.snapshot.CopyFrom(snapshot_message(snapshot))
        return bytes(reply.SerializeToString())

    async def save_snapshot(self, raw: bytes, request: RequestReceived) -> bytes:
        started = time.perf_counter()
        msg = pb.SaveSnapshotRequest()
        stream_id = stream_type = None
        try:
            msg = decode(pb.SaveSnapshotRequest, raw)
            stream_id = parse_uuid("stream_id", msg.stream_id)
            stream_type = check_name("stream_type", msg.stream_type)
            if msg.version < 1:
                raise InvalidArgument(f"version: must be at least 1, got {msg.version}")
            check_snapshot_data(msg.data, self._settings.max_snapshot_bytes)
            caller(request).check_write(stream_type)
            if self._writes_refused is not None:
                raise Unavailable(self._writes_refused)
            with trio.CancelScope(shield=True):  # as for appends: a stored write is audited
                saved = await self._snapshots.save(stream_id, stream_type, msg.version,
                                                   msg.data)
        except EventStoreError as error:
            audit.record("snapshot_save", **audit.caller_of(request),
                         outcome=type(error).__name__, seconds=time.perf_counter() - started,
                         stream_id=stream_id, stream_type=stream_type, version=msg.version,
                         reason=error.message)
            raise
        seconds, version = time.perf_counter() - started, msg.version
        after_reply(request, lambda: audit.record(
            "snapshot_save", **audit.caller_of(request), outcome="ok", seconds=seconds,
            stream_id=stream_id, stream_type=stream_type, version=version,
            snapshot_id=saved.snapshot_id))
        reply = pb.SaveSnapshotResponse(snapshot_id=saved.snapshot_id)
        reply.created_at.FromDatetime(saved.created_at)
        return bytes(reply.SerializeToString())

    def _delivery(self, max_batch_size: int, checkpoint_interval_ms: int) -> tuple[int, float]:
        if max_batch_size < 0:
            raise InvalidArgument(f"max_batch_size: must not be negative, got {max_batch_size}")
        if checkpoint_interval_ms < 0:
            raise InvalidArgument(
                f"checkpoint_interval_ms: must not be negative, got {checkpoint_interval_ms}")
        interval = checkpoint_interval_ms or self._settings.checkpoint_interval_ms
        return min(max_batch_size, self._settings.read_page_max), interval / 1000

    def subscribe_to_stream(self, raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        # Not a generator itself: the request is validated here, at the call, and the
        # transport iterates `subscribe` directly (one generator layer per message, not two).
        msg = decode(pb.SubscribeRequest, raw)
        stream_type = check_name("stream_type", msg.stream_type)
        max_batch, interval = self._delivery(msg.max_batch_size, msg.checkpoint_interval_ms)
        caller(request).check_read(stream_type)
        if msg.stream_id:
            stream_id = parse_uuid("stream_id", msg.stream_id)
            if msg.from_position:
                raise InvalidArgument("from_position: must be 0 when stream_id is given "
                                      "(use from_version)")
            if msg.from_version < 0:
                raise InvalidArgument(
                    f"from_version: must not be negative, got {msg.from_version}")
            after = 0
            selector = Selector(EventFilter((stream_type,)), stream_id, msg.from_version)
        else:
            if msg.from_version:
                raise InvalidArgument("from_version: must be 0 without stream_id "
                                      "(use from_position)")
            if msg.from_position < 0:
                raise InvalidArgument(
                    f"from_position: must not be negative, got {msg.from_position}")
            after = msg.from_position
            selector = Selector(EventFilter((stream_type,)))
        spec = SubscriptionSpec(selector, after, msg.include_existing, max_batch, interval,
                                start_version=msg.from_version if msg.stream_id else 0)
        return subscribe(self._feed, self._reader, spec)

    def subscribe_to_all(self, raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        msg = decode(pb.SubscribeAllRequest, raw)
        event_filter = parse_filter(msg.filter.stream_types, msg.filter.event_type_prefixes)
        event_filter = event_filter.restricted_to(
            caller(request).read_scope(event_filter.stream_types))
        if msg.from_position < 0:
            raise InvalidArgument(f"from_position: must not be negative, got {msg.from_position}")
        max_batch, interval = self._delivery(msg.max_batch_size, msg.checkpoint_interval_ms)
        spec = SubscriptionSpec(Selector(event_filter), msg.from_position,
                                msg.include_existing, max_batch, interval)
        return subscribe(self._feed, self._reader, spec)
