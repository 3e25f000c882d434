"""AppendEvents: every rule of API.md, through purerpc and grpcio."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trio

from eventstore.server import serve
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import GrpcioClient, PurerpcClient, RpcError
from tests.conftest import make_settings
from tests.helpers import (
    STREAM_TYPE,
    append,
    append_request,
    events,
    new_event,
    read_all,
    read_stream,
    sid,
)


async def test_append_to_new_stream_assigns_versions_positions_and_ids(api: Any) -> None:
    stream = sid()
    reply = await append(api, stream, events(3))
    assert reply.next_expected_version == 3
    assert reply.last_position - reply.first_position == 2
    assert len(reply.event_ids) == 3
    assert all(str(uuid.UUID(i)) == i for i in reply.event_ids)
    stored = await read_stream(api, stream)
    assert [e.version for e in stored] == [1, 2, 3]
    assert [e.event_id for e in stored] == list(reply.event_ids)
    assert [e.position for e in stored] == list(range(reply.first_position,
                                                      reply.last_position + 1))
    assert [e.event_type for e in stored] == ["Happened0", "Happened1", "Happened2"]
    assert stored[0].data == b'{"i": 0}'
    assert stored[0].metadata == b""
    assert stored[0].stream_id == stream and stored[0].stream_type == STREAM_TYPE
    assert stored[0].created_at.seconds > 1_700_000_000

    more = await append(api, stream, events(2))
    assert more.next_expected_version == 5
    assert more.first_position > reply.last_position


async def test_expected_version_zero_means_new_stream(api: Any) -> None:
    stream = sid()
    assert (await append(api, stream, events(2), expected=0)).next_expected_version == 2
    with pytest.raises(RpcError) as err:
        await append(api, stream, events(1), expected=0)
    assert err.value.code == "ABORTED"
    assert err.value.message == "wrong expected version: expected 0, actual 2"
    if isinstance(api, GrpcioClient):
        assert err.value.trailers["expected-version"] == "0"
        assert err.value.trailers["actual-version"] == "2"


async def test_expected_version_exact(api: Any) -> None:
    stream = sid()
    await append(api, stream, events(3))
    assert (await append(api, stream, events(1), expected=3)).next_expected_version == 4
    with pytest.raises(RpcError) as err:
        await append(api, stream, events(1), expected=3)
    assert err.value.code == "ABORTED"
    assert err.value.message == "wrong expected version: expected 3, actual 4"
    if isinstance(api, GrpcioClient):
        assert err.value.trailers == {"expected-version": "3", "actual-version": "4"}
    assert len(await read_stream(api, stream)) == 4


async def test_expected_version_minus_one_means_existing_stream(api: Any) -> None:
    stream = sid()
    with pytest.raises(RpcError) as err:
        await append(api, stream, events(1), expected=-1)
    assert err.value.code == "ABORTED"
    assert err.value.message == "wrong expected version: expected -1, actual 0"
    await append(api, stream, events(1))
    assert (await append(api, stream, events(1), expected=-1)).next_expected_version == 2


async def test_expected_version_other_negative_is_invalid(api: Any) -> None:
    with pytest.raises(RpcError) as err:
        await append(api, sid(), events(1), expected=-2)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "expected_version" in err.value.message


async def test_absent_expected_version_appends_whatever_the_version(api: Any) -> None:
    stream = sid()
    for n in range(1, 4):
        assert (await append(api, stream, events(1))).next_expected_version == n


async def test_request_with_one_bad_event_stores_nothing(api: Any) -> None:
    stream = sid()
    bad = [*events(2), new_event(data=b"{not json"), *events(1)]
    with pytest.raises(RpcError) as err:
        await append(api, stream, bad)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "events[2].data" in err.value.message
    reply = await api.call("GetEvents", pb.GetEventsRequest(stream_id=stream,
                                                            stream_type=STREAM_TYPE))
    assert reply.stream_version == 0 and not reply.events


async def test_idempotent_retry_returns_the_original_result(api: Any) -> None:
    stream = sid()
    await append(api, stream, events(2))
    evs = events(3, with_ids=True)
    first = await append(api, stream, evs, expected=2)
    await append(api, stream, events(1))  # the stream moves on
    again = await append(api, stream, evs, expected=2)  # expected is stale: still a retry
    assert again == first
    # Equal as JSON values, not as bytes: still the same event.
    reformatted = [pb.NewEvent(event_id=e.event_id, event_type=e.event_type,
                               data=e.data.replace(b": ", b":"), metadata=e.metadata)
                   for e in evs]
    assert await append(api, stream, reformatted) == first
    stored = await read_stream(api, stream)
    assert [e.version for e in stored] == [1, 2, 3, 4, 5, 6]
    assert sum(1 for e in stored if e.event_id in set(first.event_ids)) == 3


async def test_event_id_case_is_canonicalized(api: Any) -> None:
    stream = sid()
    event_id = str(uuid.uuid4())
    reply = await append(api, stream.upper(), [new_event(event_id=event_id.upper())])
    assert reply.event_ids == [event_id]
    stored = await read_stream(api, stream)
    assert stored[0].stream_id == stream and stored[0].event_id == event_id


@pytest.mark.parametrize("case", ["other_stream", "other_data", "other_type", "partial",
                                  "other_order"])
async def test_reused_event_id_is_already_exists(api: Any, case: str) -> None:
    stream = sid()
    evs = events(2, with_ids=True)
    await append(api, stream, evs)
    if case == "other_stream":
        request = append_request(sid(), evs)
    elif case == "other_data":
        request = append_request(stream, [evs[0], new_event(evs[1].event_type, b'{"x": 2}',
                                                            event_id=evs[1].event_id)])
    elif case == "other_type":
        request = append_request(stream, [evs[0], new_event("Other", evs[1].data,
                                                            event_id=evs[1].event_id)])
    elif case == "partial":
        request = append_request(stream, [*evs, *events(1, with_ids=True)])
    else:
        request = append_request(stream, [evs[1], evs[0]])
    with pytest.raises(RpcError) as err:
        await api.call("AppendEvents", request)
    assert err.value.code == "ALREADY_EXISTS"
    assert evs[0].event_id in err.value.message or evs[1].event_id in err.value.message
    assert len(await read_stream(api, stream)) == 2


async def test_snapshot_due_when_crossing_the_threshold(api: Any) -> None:
    stream = sid()
    assert not (await append(api, stream, events(99))).snapshot_due
    assert (await append(api, stream, events(2))).snapshot_due
    assert not (await append(api, stream, events(50))).snapshot_due
    assert (await append(api, stream, events(200))).snapshot_due


BAD_INPUT = [
    # (id, request builder, status, words the message must contain)
    ("stream_id not a uuid", lambda: append_request("not-a-uuid", events(1)),
     "INVALID_ARGUMENT", "stream_id"),
    ("stream_id empty", lambda: append_request("", events(1)), "INVALID_ARGUMENT", "stream_id"),
    ("stream_id braced", lambda: append_request("{" + sid() + "}", events(1)),
     "INVALID_ARGUMENT", "stream_id: not a UUID"),
    ("stream_id without hyphens", lambda: append_request(sid().replace("-", ""), events(1)),
     "INVALID_ARGUMENT", "stream_id: not a UUID"),
    ("stream_type empty", lambda: append_request(sid(), events(1), stream_type=""),
     "INVALID_ARGUMENT", "stream_type"),
    ("stream_type too long", lambda: append_request(sid(), events(1), stream_type="x" * 256),
     "INVALID_ARGUMENT", "stream_type"),
    ("stream_type with NUL", lambda: append_request(sid(), events(1), stream_type="a\x00b"),
     "INVALID_ARGUMENT", "stream_type"),
    ("no events", lambda: append_request(sid(), []), "INVALID_ARGUMENT", "events"),
    ("event_type empty", lambda: append_request(sid(), [new_event("")]),
     "INVALID_ARGUMENT", "events[0].event_type"),
    ("event_type too long", lambda: append_request(sid(), [new_event("é" * 256)]),
     "INVALID_ARGUMENT", "events[0].event_type"),
    ("data empty", lambda: append_request(sid(), [new_event(data=b"")]),
     "INVALID_ARGUMENT", "events[0].data"),
    ("data invalid json", lambda: append_request(sid(), [*events(1), new_event(data=b"{'a':1}")]),
     "INVALID_ARGUMENT", "events[1].data"),
    ("data trailing garbage", lambda: append_request(sid(), [new_event(data=b"{} x")]),
     "INVALID_ARGUMENT", "events[0].data"),
    ("data invalid utf-8", lambda: append_request(sid(), [new_event(data=b'"\xff"')]),
     "INVALID_ARGUMENT", "events[0].data"),
    ("data with \\u0000", lambda: append_request(sid(), [new_event(data=b'{"a": "\\u0000"}')]),
     "INVALID_ARGUMENT", "events[0].data"),
    ("data lone surrogate", lambda: append_request(sid(), [new_event(data=b'"\\ud800"')]),
     "INVALID_ARGUMENT", "events[0].data"),
    ("metadata not an object", lambda: append_request(sid(), [new_event(metadata=b"[1]")]),
     "INVALID_ARGUMENT", "events[0].metadata"),
    ("metadata invalid", lambda: append_request(sid(), [new_event(metadata=b"{")]),
     "INVALID_ARGUMENT", "events[0].metadata"),
    ("event_id not a uuid", lambda: append_request(sid(), [new_event(event_id="42")]),
     "INVALID_ARGUMENT", "events[0].event_id"),
    ("duplicate event_id", lambda: append_request(
        sid(), [new_event(event_id="00000000-0000-4000-8000-000000000001"),
                new_event(event_id="00000000-0000-4000-8000-000000000001")]),
     "INVALID_ARGUMENT", "events[1].event_id"),
    ("expected_version -7", lambda: append_request(sid(), events(1), expected=-7),
     "INVALID_ARGUMENT", "expected_version"),
]


@pytest.mark.parametrize(("name", "build", "code", "words"), BAD_INPUT,
                         ids=[case[0] for case in BAD_INPUT])
async def test_bad_input(api: Any, name: str, build: Any, code: str, words: str) -> None:
    with pytest.raises(RpcError) as err:
        await api.call("AppendEvents", build())
    assert err.value.code == code
    assert words in err.value.message
    assert "Traceback" not in err.value.message and "Error(" not in err.value.message
    # The server still serves.
    assert (await append(api, sid(), events(1))).next_expected_version == 1


async def test_garbage_request_bytes_are_invalid_argument(server: Any) -> None:
    g = GrpcioClient(server.port)
    try:
        rpc = g._channel.unary_unary(
            "/eventstore.v1.EventStoreService/AppendEvents",
            request_serializer=lambda b: b,
            response_deserializer=pb.AppendEventsResponse.FromString,
        )
        import grpc

        with pytest.raises(grpc.RpcError) as err:
            await trio.to_thread.run_sync(lambda: rpc(b"\xff\xff\xff", timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    finally:
        g.close()


async def test_size_limits_are_resource_exhausted(nursery: trio.Nursery,
                                                  database_url: str) -> None:
    settings = make_settings(database_url, max_event_bytes=1000, max_request_bytes=4096,
                             max_events_per_request=5)
    info = await nursery.start(serve, settings)
    async with PurerpcClient.connect(info.port) as api:
        big = b'{"s": "' + b"x" * 1000 + b'"}'
        cases = [
            (append_request(sid(), [new_event(data=big)]), "events[0]"),
            (append_request(sid(), events(6)), "events"),
            (append_request(sid(), [new_event(data=b'{"s": "' + b"y" * 900 + b'"}')
                                    for _ in range(5)]), "request"),
        ]
        for request, words in cases:
            with pytest.raises(RpcError) as err:
                await api.call("AppendEvents", request)
            assert err.value.code == "RESOURCE_EXHAUSTED", err.value
            assert words in err.value.message
        assert (await append(api, sid(), events(5))).next_expected_version == 5


async def test_unknown_method_answers_unimplemented(server: Any) -> None:
    import grpc

    g = GrpcioClient(server.port)
    try:
        rpc = g._channel.unary_unary(
            "/eventstore.v1.EventStoreService/DropEverything",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            await trio.to_thread.run_sync(lambda: rpc(b"", timeout=10))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        assert "DropEverything" in (err.value.details() or "")  # type: ignore[attr-defined]
    finally:
        g.close()


async def test_many_requests_in_one_batch_resolve_individually(client: PurerpcClient) -> None:
    """Concurrent requests land in shared transactions; a conflict or a bad request among them
    fails only itself."""
    stream = sid()
    await append(client, stream, events(1))
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        if i % 10 == 3:
            request = append_request(stream, events(1), expected=0)  # conflicts
        elif i % 10 == 7:
            request = append_request(sid(), [new_event(data=b"nope")])  # invalid
        else:
            request = append_request(sid(), events(2))
        try:
            results[i] = await client.call("AppendEvents", request)
        except RpcError as exc:
            results[i] = exc.code

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(one, i)
    for i, result in results.items():
        if i % 10 == 3:
            assert result == "ABORTED"
        elif i % 10 == 7:
            assert result == "INVALID_ARGUMENT"
        else:
            assert isinstance(result, pb.AppendEventsResponse)
            assert result.next_expected_version == 2
    everything = await read_all(client)
    assert len(everything) == 1 + 2 * 48
    assert [e.position for e in everything] == sorted(e.position for e in everything)


async def test_a_client_breaking_http2_gets_goaway_and_others_are_served(
        api: Any, server: Any) -> None:
    """Over a real socket: a request that is not gRPC is answered with an HTTP status on its
    own stream; a frame that breaks the protocol ends that connection with GOAWAY (and its
    error code); other connections are served throughout."""

    def talk() -> list[object]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":path", "/"),
                                    (":authority", "x")], end_stream=True)
            sock.sendall(client.data_to_send())
            seen: list[object] = []
            while not any(isinstance(e, h2.events.StreamEnded) for e in seen):
                seen += client.receive_data(sock.recv(65536))
            # WINDOW_UPDATE with an increment of 0 for the connection: PROTOCOL_ERROR.
            sock.sendall(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")
            while data := sock.recv(65536):
                seen += client.receive_data(data)
            return seen

    seen = await trio.to_thread.run_sync(talk)
    statuses = [dict(e.headers)[b":status"] for e in seen
                if isinstance(e, h2.events.ResponseReceived)]
    assert statuses == [b"405"]
    ended = [e for e in seen if isinstance(e, h2.events.ConnectionTerminated)]
    assert [e.error_code for e in ended] == [1]  # PROTOCOL_ERROR, then EOF
    assert (await append(api, sid(), events(1))).next_expected_version == 1
