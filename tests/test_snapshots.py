"""Snapshots: SaveSnapshot / GetSnapshot rules, GetEvents with include_snapshot, retention, and
the client's load_stream — through purerpc and grpcio."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
import pytest
import trio

from eventstore.client import EventStoreClient, NewEvent
from eventstore.server import serve
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import RpcError
from tests.conftest import make_settings
from tests.helpers import STREAM_TYPE, append, events, sid


def save(stream: str, version: int, data: bytes = b'{"n": 1}',
         stream_type: str = STREAM_TYPE) -> pb.SaveSnapshotRequest:
    return pb.SaveSnapshotRequest(stream_id=stream, stream_type=stream_type, version=version,
                                  data=data)


def get(stream: str, max_version: int | None = None) -> pb.GetSnapshotRequest:
    request = pb.GetSnapshotRequest(stream_id=stream, stream_type=STREAM_TYPE)
    if max_version is not None:
        request.max_version = max_version
    return request


async def test_save_and_get_latest_or_at_most(api: Any) -> None:
    stream = sid()
    await append(api, stream, events(30))
    assert not (await api.call("GetSnapshot", get(stream))).found
    first = await api.call("SaveSnapshot", save(stream, 10, b'{"total": 10}'))
    second = await api.call("SaveSnapshot", save(stream, 20, b'{"total": 20}'))
    assert first.snapshot_id != second.snapshot_id
    assert second.created_at.seconds > 1_700_000_000
    latest = await api.call("GetSnapshot", get(stream))
    assert latest.found and latest.snapshot.version == 20
    assert latest.snapshot.snapshot_id == second.snapshot_id
    assert orjson.loads(latest.snapshot.data) == {"total": 20}
    assert latest.snapshot.stream_id == stream and latest.snapshot.stream_type == STREAM_TYPE
    at_most = await api.call("GetSnapshot", get(stream, max_version=19))
    assert at_most.snapshot.version == 10
    assert not (await api.call("GetSnapshot", get(stream, max_version=9))).found


async def test_saving_again_is_idempotent_or_already_exists(api: Any) -> None:
    stream = sid()
    await append(api, stream, events(5))
    first = await api.call("SaveSnapshot", save(stream, 5, b'{"a": 1, "b": [1, 2]}'))
    # Equal as JSON values (spacing, key order): the same snapshot, nothing changes.
    again = await api.call("SaveSnapshot", save(stream, 5, b'{"b":[1,2],"a":1}'))
    assert again.snapshot_id == first.snapshot_id and again.created_at == first.created_at
    with pytest.raises(RpcError) as err:
        await api.call("SaveSnapshot", save(stream, 5, b'{"a": 2}'))
    assert err.value.code == "ALREADY_EXISTS" and "version" in err.value.message


async def test_snapshot_beyond_the_stream_is_failed_precondition(api: Any) -> None:
    stream = sid()
    with pytest.raises(RpcError) as err:
        await api.call("SaveSnapshot", save(stream, 1))
    assert err.value.code == "FAILED_PRECONDITION"
    assert "beyond the stream's version 0" in err.value.message
    await append(api, stream, events(3))
    with pytest.raises(RpcError) as err:
        await api.call("SaveSnapshot", save(stream, 4))
    assert err.value.code == "FAILED_PRECONDITION"
    assert (await api.call("SaveSnapshot", save(stream, 3))).snapshot_id


@pytest.mark.parametrize(("request_kw", "code", "words"), [
    ({"version": 0}, "INVALID_ARGUMENT", "version"),
    ({"version": -3}, "INVALID_ARGUMENT", "version"),
    ({"data": b"{not json"}, "INVALID_ARGUMENT", "data"),
    ({"data": b""}, "INVALID_ARGUMENT", "data"),
    # Checked by the rules event data is (README, Limits): refused before the database.
    ({"data": b'{"a": "\\u0000"}'}, "INVALID_ARGUMENT",
     "data: invalid JSON: strings must not contain \\u0000"),
    ({"data": b'"\\ud800"'}, "INVALID_ARGUMENT", "data: invalid JSON"),
    ({"data": b'{"a": 1} {}'}, "INVALID_ARGUMENT", "data: invalid JSON"),
    ({"stream_id": "nope"}, "INVALID_ARGUMENT", "stream_id"),
    ({"stream_type": ""}, "INVALID_ARGUMENT", "stream_type"),
])
async def test_save_bad_input(api: Any, request_kw: dict[str, Any], code: str,
                              words: str) -> None:
    stream = sid()
    await append(api, stream, events(2))
    kw: dict[str, Any] = {"stream_id": stream, "stream_type": STREAM_TYPE, "version": 1,
                          "data": b"{}", **request_kw}
    with pytest.raises(RpcError) as err:
        await api.call("SaveSnapshot", pb.SaveSnapshotRequest(**kw))
    assert err.value.code == code, err.value
    assert words in err.value.message
    assert not (await api.call("GetSnapshot", get(stream))).found
    await api.call("SaveSnapshot", save(stream, 1))  # still serving


async def test_snapshot_data_is_any_json_that_jsonb_takes(api: Any) -> None:
    """Numbers beyond a double (which an event's data may hold too) are valid jsonb."""
    stream = sid()
    await append(api, stream, events(1))
    data = b'{"big": 1e400, "precise": 0.10000000000000000000000000001}'
    await api.call("SaveSnapshot", pb.SaveSnapshotRequest(
        stream_id=stream, stream_type=STREAM_TYPE, version=1, data=data))
    got = await api.call("GetSnapshot", get(stream))
    assert got.found and b"1e400" not in got.snapshot.data  # jsonb prints numerics in full
    assert got.snapshot.data.replace(b" ", b"").startswith(b'{"big":1' + b"0" * 400)


async def test_get_snapshot_bad_input(api: Any) -> None:
    with pytest.raises(RpcError) as err:
        await api.call("GetSnapshot", get("xyz"))
    assert err.value.code == "INVALID_ARGUMENT" and "stream_id" in err.value.message
    with pytest.raises(RpcError) as err:
        await api.call("GetSnapshot", get(sid(), max_version=-1))
    assert err.value.code == "INVALID_ARGUMENT" and "max_version" in err.value.message


async def test_get_events_with_snapshot_returns_snapshot_and_events_since(api: Any) -> None:
    stream = sid()
    await append(api, stream, events(30))
    await api.call("SaveSnapshot", save(stream, 25, b'{"at": 25}'))
    await api.call("SaveSnapshot", save(stream, 12, b'{"at": 12}'))
    reply = await api.call("GetEvents", pb.GetEventsRequest(
        stream_id=stream, stream_type=STREAM_TYPE, include_snapshot=True))
    assert reply.HasField("snapshot") and reply.snapshot.version == 25
    assert [e.version for e in reply.events] == [26, 27, 28, 29, 30]
    # to_version bounds the snapshot too; from_version beyond the snapshot wins.
    reply = await api.call("GetEvents", pb.GetEventsRequest(
        stream_id=stream, stream_type=STREAM_TYPE, include_snapshot=True, to_version=20))
    assert reply.snapshot.version == 12 and [e.version for e in reply.events] == list(
        range(13, 21))
    reply = await api.call("GetEvents", pb.GetEventsRequest(
        stream_id=stream, stream_type=STREAM_TYPE, include_snapshot=True, from_version=28))
    assert reply.snapshot.version == 25 and [e.version for e in reply.events] == [28, 29, 30]
    # Without a snapshot: all events, no snapshot field.
    other = sid()
    await append(api, other, events(3))
    reply = await api.call("GetEvents", pb.GetEventsRequest(
        stream_id=other, stream_type=STREAM_TYPE, include_snapshot=True))
    assert not reply.HasField("snapshot") and len(reply.events) == 3


async def test_snapshot_and_events_stay_consistent_while_appends_continue(
        nursery: trio.Nursery, database_url: str) -> None:
    info = await nursery.start(serve, make_settings(database_url))
    stream = sid()
    async with EventStoreClient.connect("127.0.0.1", info.port) as client:
        await client.append_events(stream, STREAM_TYPE, [NewEvent("E", {"i": 0})])
        stop = trio.Event()

        async def writer() -> None:
            i = 1
            while not stop.is_set() and i < 2000:
                result = await client.append_events(stream, STREAM_TYPE,
                                                    [NewEvent("E", {"i": i})])
                if result.next_expected_version % 7 == 0:
                    await client.save_snapshot(stream, STREAM_TYPE,
                                               result.next_expected_version,
                                               {"upto": result.next_expected_version})
                i += 1

        async with trio.open_nursery() as inner:
            inner.start_soon(writer)
            with trio.fail_after(60):
                for _ in range(40):
                    snapshot, loaded = await client.load_stream(stream, STREAM_TYPE)
                    base = snapshot.version if snapshot else 0
                    assert [e.version for e in loaded] == list(
                        range(base + 1, base + 1 + len(loaded)))
                    if snapshot is not None:
                        assert snapshot.json() == {"upto": snapshot.version}
                    await trio.sleep(0.01)
            stop.set()


async def test_concurrent_saves_of_one_version(nursery: trio.Nursery, database_url: str) -> None:
    info = await nursery.start(serve, make_settings(database_url))
    stream = sid()
    async with EventStoreClient.connect("127.0.0.1", info.port) as client:
        await client.append_events(stream, STREAM_TYPE, [NewEvent("E", {}) for _ in range(3)])
        same: list[str] = []
        conflicts: list[str] = []

        async def save_one(data: object) -> None:
            try:
                saved = await client.save_snapshot(stream, STREAM_TYPE, 3, data)
                same.append(saved.snapshot_id)
            except Exception as exc:
                conflicts.append(type(exc).__name__)

        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                for _ in range(10):
                    inner.start_soon(save_one, {"v": 3})
        assert len(same) == 10 and len(set(same)) == 1 and not conflicts
        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                for i in range(10):
                    inner.start_soon(save_one, {"v": 100 + i})
        assert conflicts == ["AlreadyExists"] * 10
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM snapshots").fetchone() == (1,)


async def test_retention_deletes_old_snapshots_but_keeps_each_latest(
        nursery: trio.Nursery, database_url: str) -> None:
    streams = [sid() for _ in range(3)]
    info = await nursery.start(serve, make_settings(database_url))
    async with EventStoreClient.connect("127.0.0.1", info.port) as client:
        for stream in streams:
            await client.append_events(stream, STREAM_TYPE, [NewEvent("E", {})] * 5)
            for version in (1, 2, 3):
                await client.save_snapshot(stream, STREAM_TYPE, version, {"v": version})
    # Age them instead of waiting: stream 0 all old, stream 1 only versions 1-2 old.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE snapshots SET created_at = now() - interval '40 days'"
                     " WHERE stream_id = %s", (streams[0],))
        conn.execute("UPDATE snapshots SET created_at = now() - interval '40 days'"
                     " WHERE stream_id = %s AND version < 3", (streams[1],))
        conn.execute("UPDATE snapshots SET created_at = now() - interval '10 days'"
                     " WHERE stream_id = %s", (streams[2],))
    # A second server whose retention task runs at once, every 50 ms.
    settings = make_settings(database_url, snapshot_retention_interval_seconds=0.05)
    await nursery.start(serve, settings)
    with trio.fail_after(20):
        while True:
            with psycopg.connect(database_url) as conn:
                rows = conn.execute("SELECT stream_id::text, version FROM snapshots"
                                    " ORDER BY stream_id, version").fetchall()
            if len(rows) == 5:
                break
            await trio.sleep(0.05)
    left = {(s, v) for s, v in rows}
    assert left == {(streams[0], 3), (streams[1], 3), (streams[2], 1), (streams[2], 2),
                    (streams[2], 3)}
