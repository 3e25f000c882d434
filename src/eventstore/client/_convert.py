"""Between the client's types and the protobuf messages of eventstore.v1."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from eventstore.client.models import (
    AppendResult,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    SavedSnapshot,
    Snapshot,
)
from eventstore.v1 import eventstore_pb2 as pb

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def json_bytes(value: Any) -> bytes:
    """JSON bytes for a payload: bytes-like values as they are, anything else via orjson."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return orjson.dumps(value)


def uuid_text(value: str | uuid.UUID) -> str:
    return str(value)


def new_event(event: NewEvent) -> Any:
    if not isinstance(event, NewEvent):
        raise TypeError(f"events must be NewEvent instances, got {type(event).__name__}")
    return pb.NewEvent(
        event_id="" if event.event_id is None else uuid_text(event.event_id),
        event_type=event.event_type,
        data=json_bytes(event.data),
        metadata=b"" if event.metadata is None else json_bytes(event.metadata),
    )


def expected_version(value: int | ExpectedVersion | None) -> int | None:
    """The wire value of `expected_version` (None: absent)."""
    if value is None or value is ExpectedVersion.ANY:
        return None
    if isinstance(value, ExpectedVersion):
        return int(value.value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected_version must be an int, an ExpectedVersion or None, "
                        f"got {type(value).__name__}")
    return value


def append_request(stream_id: str | uuid.UUID, stream_type: str, events: Sequence[NewEvent],
                   expected: int | ExpectedVersion | None) -> Any:
    request = pb.AppendEventsRequest(stream_id=uuid_text(stream_id), stream_type=stream_type,
                                     events=[new_event(e) for e in events])
    version = expected_version(expected)
    if version is not None:
        request.expected_version = version
    return request


def timestamp(ts: Any) -> datetime:
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def recorded_event(event: Any) -> RecordedEvent:
    return RecordedEvent(
        event_id=event.event_id,
        stream_id=event.stream_id,
        stream_type=event.stream_type,
        version=event.version,
        event_type=event.event_type,
        data=event.data,
        metadata=event.metadata,
        created_at=timestamp(event.created_at),
        position=event.position,
    )


def append_result(reply: Any) -> AppendResult:
    return AppendResult(
        next_expected_version=reply.next_expected_version,
        first_position=reply.first_position,
        last_position=reply.last_position,
        event_ids=tuple(reply.event_ids),
        snapshot_due=reply.snapshot_due,
    )


def snapshot(message: Any) -> Snapshot:
    return Snapshot(
        snapshot_id=message.snapshot_id,
        stream_id=message.stream_id,
        stream_type=message.stream_type,
        version=message.version,
        data=message.data,
        created_at=timestamp(message.created_at),
    )


def saved_snapshot(reply: Any) -> SavedSnapshot:
    return SavedSnapshot(snapshot_id=reply.snapshot_id, created_at=timestamp(reply.created_at))
