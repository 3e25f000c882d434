"""Small builders shared by the API tests."""

from __future__ import annotations

import uuid
from typing import Any

from eventstore.v1 import eventstore_pb2 as pb

STREAM_TYPE = "VocabularyItem"


def new_event(event_type: str = "Created", data: bytes = b'{"n": 1}', *, event_id: str = "",
              metadata: bytes = b"") -> pb.NewEvent:
    return pb.NewEvent(event_id=event_id, event_type=event_type, data=data, metadata=metadata)


def events(n: int, *, with_ids: bool = False, prefix: str = "Happened") -> list[pb.NewEvent]:
    return [
        new_event(f"{prefix}{i}", f'{{"i": {i}}}'.encode(),
                  event_id=str(uuid.uuid4()) if with_ids else "")
        for i in range(n)
    ]


def append_request(stream_id: str, evs: list[pb.NewEvent], expected: int | None = None,
                   stream_type: str = STREAM_TYPE) -> pb.AppendEventsRequest:
    req = pb.AppendEventsRequest(stream_id=stream_id, stream_type=stream_type, events=evs)
    if expected is not None:
        req.expected_version = expected
    return req


async def append(api: Any, stream_id: str, evs: list[pb.NewEvent], expected: int | None = None,
                 stream_type: str = STREAM_TYPE) -> pb.AppendEventsResponse:
    return await api.call("AppendEvents", append_request(stream_id, evs, expected, stream_type))


async def read_stream(api: Any, stream_id: str, stream_type: str = STREAM_TYPE,
                      page: int = 1000) -> list[pb.Event]:
    """Every event of a stream, following pages."""
    out: list[pb.Event] = []
    from_version = 0
    for _ in range(100_000):
        reply = await api.call("GetEvents", pb.GetEventsRequest(
            stream_id=stream_id, stream_type=stream_type, from_version=from_version,
            max_count=page))
        out.extend(reply.events)
        if not reply.has_more:
            return out
        assert reply.next_from_version > from_version
        from_version = reply.next_from_version
    raise AssertionError("too many pages")


async def read_all(api: Any, after: int = 0, page: int = 1000,
                   stream_types: tuple[str, ...] = (),
                   prefixes: tuple[str, ...] = ()) -> list[pb.Event]:
    out: list[pb.Event] = []
    for _ in range(100_000):
        reply = await api.call("ReadAll", pb.ReadAllRequest(
            from_position=after, max_count=page,
            filter=pb.Filter(stream_types=stream_types, event_type_prefixes=prefixes)))
        out.extend(reply.events)
        assert reply.next_from_position >= after
        after = reply.next_from_position
        if not reply.has_more:
            return out
    raise AssertionError("too many pages")


def sid() -> str:
    return str(uuid.uuid4())
