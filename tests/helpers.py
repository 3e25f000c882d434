"""Small builders shared by the API tests."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import psycopg
import trio

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


async def until_the_append_lock_is_awaited(database_url: str) -> None:
    """Wait until some session waits for the append lock (an advisory lock another session
    holds): the writer's commit has reached it."""
    with psycopg.connect(database_url, autocommit=True) as watcher:
        for _ in range(500):
            row = watcher.execute("SELECT count(*) FROM pg_locks WHERE locktype ="
                                  " 'advisory' AND NOT granted").fetchone()
            if row and row[0]:
                return
            await trio.sleep(0.02)
    raise AssertionError("the append never reached the lock")


def sid() -> str:
    return str(uuid.uuid4())


def http_get(port: int, path: str) -> tuple[int, bytes, str]:
    """GET http://127.0.0.1:port/path: status, body, content type."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read(), reply.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("content-type", "")


async def get(port: int, path: str) -> tuple[int, bytes, str]:
    return await trio.to_thread.run_sync(http_get, port, path)


def health_check(port: int, service: str = "",
                 metadata: Sequence[tuple[str, str]] = ()) -> int:
    """grpc.health.v1.Health/Check through grpcio (no generated stub: the messages are one
    field each), without credentials unless given; HealthCheckResponse.status (1 = SERVING,
    0 = UNKNOWN)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        name = service.encode()
        reply: bytes = check((b"\x0a" + bytes([len(name)]) + name) if name else b"",
                             metadata=tuple(metadata) or None, timeout=10)
    return reply[1] if reply else 0
