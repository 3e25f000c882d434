"""The server's HTTP/2 connection (`eventstore.grpc.http2`) against h2's client, without I/O:
what purerpc's streams see of a request, what a client sees of a response, flow control,
resets, and what happens to a client that breaks the protocol."""

from __future__ import annotations

import gzip
import itertools
import struct
import urllib.parse
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived, WindowUpdated
from purerpc.grpclib.exceptions import MessageTooLargeError, StreamClosedError
from purerpc.grpclib.status import Status, StatusCode

from eventstore.grpc.http2 import (
    OUR_MAX_HEADER_LIST_SIZE,
    Http2ConnectionError,
    ServerConnection,
    StreamReset,
    _MessageReader,
)
from eventstore.grpc.transport import GrpcServer, Method, after_reply

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Service/Method"),
           (":authority", "localhost"), ("te", "trailers"),
           ("content-type", "application/grpc+proto")]


def _message(payload: bytes) -> bytes:
    return struct.pack(">?I", False, len(payload)) + payload


def _pair(**settings: int) -> tuple[ServerConnection, h2.connection.H2Connection]:
    """A server connection and h2's client, past the settings exchange."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    if settings:
        client.update_settings({getattr(h2.settings.SettingCodes, k): v
                                for k, v in settings.items()})
    server = ServerConnection(GRPCConfiguration(client_side=False))
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the client's SETTINGS ACK
    return server, client


def _exchange(server: ServerConnection, client: h2.connection.H2Connection) -> list[object]:
    """Client's pending bytes to the server, and the server's answer back: the client's
    events."""
    server.receive_data(client.data_to_send())
    return client.receive_data(server.data_to_send())


def test_a_unary_call_both_ways_twice() -> None:
    """Twice on one connection: the client's second header block refers to its HPACK table."""
    server, client = _pair()
    for stream_id in (1, 3):
        client.send_headers(stream_id, [*REQUEST, ("authorization", "Bearer t"),
                                        ("x-trace-bin", "AAEC"), ("grpc-timeout", "250m")])
        client.send_data(stream_id, _message(b"hello"), end_stream=True)
        events = server.receive_data(client.data_to_send())
        assert [type(e) for e in events] == [RequestReceived, MessageReceived, RequestEnded]
        request = events[0]
        assert (request.stream_id, request.service_name, request.method_name) == (
            stream_id, "pkg.Service", "Method")
        assert request.custom_metadata == (("authorization", "Bearer t"),
                                           ("x-trace-bin", b"\x00\x01\x02"))
        assert request.timeout.total_seconds() == 0.25
        assert events[1].data == b"hello"
        server.acknowledge_received_data(stream_id, events[1].flow_controlled_length)
        server.start_response(stream_id, "+proto")
        server.send_data(stream_id, _message(b"reply"))
        server.end_response(stream_id, Status(StatusCode.OK))
        seen = client.receive_data(server.data_to_send())
        assert [type(e) for e in seen] == [h2.events.ResponseReceived, h2.events.DataReceived,
                                           h2.events.TrailersReceived, h2.events.StreamEnded]
        assert seen[0].headers == [(b":status", b"200"),
                                   (b"content-type", b"application/grpc+proto")]
        assert seen[1].data == _message(b"reply")
        assert seen[2].headers == [(b"grpc-status", b"0")]
    assert not server._streams  # both closed both ways


def test_error_trailers_and_trailers_only_responses() -> None:
    server, client = _pair()
    client.send_headers(1, REQUEST)
    client.send_headers(3, REQUEST, end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, RequestReceived, RequestEnded]
    server.start_response(1, "+proto")
    server.end_response(1, Status(StatusCode.ABORTED, "wrong version: 3 ≠ 4 %"),
                        (("expected", "3"), ("detail-bin", b"\xff\x00")))
    server.respond_status(3, Status(StatusCode.NOT_FOUND, "no such stream"), "+proto")
    seen = client.receive_data(server.data_to_send())
    headers = [e.headers for e in seen if isinstance(
        e, h2.events.ResponseReceived | h2.events.TrailersReceived)]
    assert headers[1] == [(b"grpc-status", b"10"),
                          (b"grpc-message", b"wrong%20version%3A%203%20%E2%89%A0%204%20%25"),
                          (b"expected", b"3"), (b"detail-bin", b"/wA")]
    assert headers[2] == [(b":status", b"200"), (b"content-type", b"application/grpc+proto"),
                          (b"grpc-status", b"5"), (b"grpc-message", b"no%20such%20stream")]
    ended = {e.stream_id for e in seen if isinstance(e, h2.events.StreamEnded)}
    assert ended == {1, 3}
    # Stream 1's request side was still open: the client is asked to stop sending it (RFC 9113
    # §8.1), and the stream is forgotten; DATA already on its way is ignored but still frees
    # its share of the connection's window.
    assert [(e.stream_id, e.error_code) for e in seen if isinstance(e, h2.events.StreamReset)
            ] == [(1, h2.errors.ErrorCodes.NO_ERROR)]
    assert not server._streams
    late = _message(b"late")
    assert server.receive_data(_raw_frame(0x0, 0x1, 1, late)) == []
    assert server._received == len(late)


def test_large_trailers_are_split_into_continuation_frames() -> None:
    server, client = _pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.start_response(1)
    big = "x" * 40_000
    server.end_response(1, Status(StatusCode.INTERNAL, "boom"), (("big", big),))
    seen = client.receive_data(server.data_to_send())
    trailers = next(e for e in seen if isinstance(e, h2.events.TrailersReceived))
    assert (b"big", big.encode()) in trailers.headers


def test_flow_control_follows_the_clients_windows_and_settings() -> None:
    server, client = _pair(INITIAL_WINDOW_SIZE=10, MAX_FRAME_SIZE=20_000)
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.start_response(1)
    assert server.flow_control_window(1) == 10
    server.send_data(1, b"0123456789")
    assert server.flow_control_window(1) == 0
    with pytest.raises(ValueError, match="flow-control window"):
        server.send_data(1, b"x")
    # A WINDOW_UPDATE for the stream, then a larger INITIAL_WINDOW_SIZE: both open it.
    client.receive_data(server.data_to_send())
    client.increment_flow_control_window(5, stream_id=1)
    events = server.receive_data(client.data_to_send())
    assert [(type(e), e.stream_id) for e in events] == [(WindowUpdated, 1)]
    assert server.flow_control_window(1) == 5
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    events = server.receive_data(client.data_to_send())
    assert [(type(e), e.stream_id) for e in events] == [(WindowUpdated, 0)]
    assert server.flow_control_window(1) == 20_000  # the client's MAX_FRAME_SIZE
    for _ in range(3):
        server.send_data(1, b"y" * 20_000)
    # The connection's own window (65,535 less the 60,010 bytes sent) is now the limit.
    assert server.flow_control_window(1) == 5_525
    seen = client.receive_data(server.data_to_send())
    assert sum(len(e.data) for e in seen if isinstance(e, h2.events.DataReceived)) == 60_000
    client.increment_flow_control_window(100_000)
    server.receive_data(client.data_to_send())
    assert server.flow_control_window(1) == 20_000


def test_a_request_larger_than_a_window_is_acknowledged_and_read() -> None:
    """A client's 200 kB message crosses its default 64 kB connection window only because
    the server opened the connection's window at the start."""
    server, client = _pair()
    client.send_headers(1, REQUEST)
    payload = bytes(range(256)) * 800
    message = _message(payload)
    got: list[object] = []
    while message:
        size = min(client.local_flow_control_window(1), client.max_outbound_frame_size,
                   len(message))
        client.send_data(1, message[:size], end_stream=size == len(message))
        message = message[size:]
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, MessageReceived):
                server.acknowledge_received_data(1, event.flow_controlled_length)
            got.append(event)
        client.receive_data(server.data_to_send())
    assert [type(e) for e in got] == [RequestReceived, MessageReceived, RequestEnded]
    assert got[1].data == payload


def test_a_reset_stream_ends_its_request_and_refuses_sends() -> None:
    server, client = _pair()
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    server.start_response(1)
    client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    events = server.receive_data(client.data_to_send())
    assert [(type(e), e.stream_id) for e in events] == [
        (RequestEnded, 1), (WindowUpdated, 1), (StreamReset, 1)]
    for send in (lambda: server.send_data(1, b"x"), lambda: server.flow_control_window(1),
                 lambda: server.end_response(1, Status(StatusCode.OK))):
        with pytest.raises(StreamClosedError):
            send()
    # The connection goes on.
    client.send_headers(3, REQUEST, end_stream=True)
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [
        RequestReceived, RequestEnded]


def test_requests_that_are_not_grpc_get_an_http_status_and_the_connection_goes_on() -> None:
    server, client = _pair()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":path", "/"),
                            (":authority", "localhost")], end_stream=True)
    client.send_headers(3, [*REQUEST[:5], ("content-type", "text/plain")], end_stream=True)
    assert server.receive_data(client.data_to_send()) == []
    seen = client.receive_data(server.data_to_send())
    statuses = [(e.stream_id, dict(e.headers)[b":status"]) for e in seen
                if isinstance(e, h2.events.ResponseReceived)]
    assert statuses == [(1, b"405"), (3, b"415")]
    # Headers over the advertised list size: RESOURCE_EXHAUSTED for that call.
    client.send_headers(5, [*REQUEST, ("x-big", "v" * OUR_MAX_HEADER_LIST_SIZE)],
                        end_stream=True)
    assert server.receive_data(client.data_to_send()) == []
    seen = client.receive_data(server.data_to_send())
    response = next(e for e in seen if isinstance(e, h2.events.ResponseReceived))
    assert (b"grpc-status", b"8") in response.headers
    client.send_headers(7, REQUEST, end_stream=True)
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [
        RequestReceived, RequestEnded]


def _raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream_id) + payload


def _literals(headers: list[tuple[str, str]]) -> bytes:
    out = b""
    for name, value in headers:
        out += bytes((0, len(name))) + name.encode() + bytes((len(value),)) + value.encode()
    return out


def test_a_malformed_request_is_reset_and_the_connection_goes_on() -> None:
    server, client = _pair()
    bad = _literals([(":method", "POST"), (":scheme", "http"), (":path", "/a/b"),
                     ("Content-Type", "application/grpc")])
    assert server.receive_data(_raw_frame(0x1, 0x5, 1, bad)) == []
    assert server.data_to_send() == _raw_frame(0x3, 0x0, 1, b"\0\0\0\x01")
    # Binary metadata that is not base64.
    bad = _literals([*REQUEST, ("x-id-bin", "not base64!")])
    assert server.receive_data(_raw_frame(0x1, 0x5, 3, bad)) == []
    assert server.data_to_send() == _raw_frame(0x3, 0x0, 3, b"\0\0\0\x01")
    client.send_headers(5, REQUEST, end_stream=True)
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [
        RequestReceived, RequestEnded]


@pytest.mark.parametrize(("frame", "code"), [
    (_raw_frame(0x0, 0x1, 9, b"x"), h2.errors.ErrorCodes.PROTOCOL_ERROR),  # DATA, idle
    (_raw_frame(0x1, 0x5, 2, b""), h2.errors.ErrorCodes.PROTOCOL_ERROR),  # even stream
    (_raw_frame(0x1, 0x5, 1, b"\xff"), h2.errors.ErrorCodes.COMPRESSION_ERROR),
    (_raw_frame(0x8, 0x0, 0, b"\0\0\0\0"), h2.errors.ErrorCodes.PROTOCOL_ERROR),
    (_raw_frame(0x8, 0x0, 0, b"\x7f\xff\xff\xff"), h2.errors.ErrorCodes.FLOW_CONTROL_ERROR),
    (_raw_frame(0x4, 0x0, 0, struct.pack(">HI", 5, 100)), h2.errors.ErrorCodes.PROTOCOL_ERROR),
    (_raw_frame(0x4, 0x0, 0, struct.pack(">HI", 4, 2**31)),
     h2.errors.ErrorCodes.FLOW_CONTROL_ERROR),
    (_raw_frame(0x6, 0x0, 0, b"1234"), h2.errors.ErrorCodes.FRAME_SIZE_ERROR),
    (_raw_frame(0x3, 0x0, 11, b"\0\0\0\x08"), h2.errors.ErrorCodes.PROTOCOL_ERROR),
])
def test_protocol_errors_end_the_connection_with_goaway(frame: bytes, code: int) -> None:
    server, client = _pair()
    with pytest.raises(Http2ConnectionError):
        server.receive_data(frame)
    seen = client.receive_data(server.data_to_send())
    assert [(type(e), e.error_code) for e in seen] == [(h2.events.ConnectionTerminated, code)]
    # Nothing more is read after the GOAWAY.
    assert server.receive_data(_raw_frame(0x1, 0x5, 13, _literals(REQUEST))) == []


def test_not_http2_at_all() -> None:
    server = ServerConnection(GRPCConfiguration(client_side=False))
    with pytest.raises(Http2ConnectionError):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def test_ping_is_answered_and_a_table_size_change_is_acknowledged_in_the_next_block() -> None:
    server, client = _pair()
    client.ping(b"12345678")
    seen = _exchange(server, client)
    assert [(type(e), e.ping_data) for e in seen] == [(h2.events.PingAckReceived, b"12345678")]
    client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.start_response(1, "+proto")
    server.end_response(1, Status(StatusCode.OK))
    sent = server.data_to_send()
    assert b"\x20\x88" in sent  # the size update opens the response's header block
    seen = client.receive_data(sent)
    assert any(isinstance(e, h2.events.TrailersReceived) for e in seen)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 255), st.integers(0, 9),
                          st.binary(max_size=40)), max_size=8))
def test_any_frames_end_in_events_or_a_connection_error(
        frames: list[tuple[int, int, int, bytes]]) -> None:
    """Whatever a client sends, the connection answers with events, stream resets or a
    GOAWAY: never another exception (which would end the connection without one)."""
    server, client = _pair()
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    server.start_response(1)
    try:
        for kind, flags, stream_id, payload in frames:
            server.receive_data(_raw_frame(kind, flags, stream_id, payload))
    except Http2ConnectionError:
        assert b"\x07\x00\x00\x00\x00\x00" in server.data_to_send()  # a GOAWAY went out


def test_settings_cannot_push_a_window_over_the_limit_and_cost_one_pass() -> None:
    """§6.9.2; and many INITIAL_WINDOW_SIZE entries in one frame are applied once (a frame
    of them used to cost entries × streams)."""
    server, client = _pair()
    for stream_id in range(1, 2001, 2):
        client.send_headers(stream_id, REQUEST)
    server.receive_data(client.data_to_send())
    entries = b"".join(struct.pack(">HI", 4, 70_000 + i) for i in range(20_000))
    server.receive_data(_raw_frame(0x4, 0x0, 0, entries))
    assert {s.send_window for s in server._streams.values()} == {89_999}
    server.receive_data(_raw_frame(0x8, 0x0, 1, struct.pack(">I", 2**31 - 1 - 89_999)))
    with pytest.raises(Http2ConnectionError, match="over 2\\^31-1"):
        server.receive_data(_raw_frame(0x4, 0x0, 0, struct.pack(">HI", 4, 100_000)))


def test_streams_out_of_order_or_closed_are_reset_not_ignored() -> None:
    server, _ = _pair()
    server.receive_data(_raw_frame(0x1, 0x5, 5, _literals(REQUEST)))
    server.data_to_send()
    # A lower id than one already opened, and HEADERS on a stream whose request has ended.
    assert server.receive_data(_raw_frame(0x1, 0x5, 3, _literals(REQUEST))) == []
    assert server.data_to_send() == _raw_frame(0x3, 0x0, 3, b"\0\0\0\x05")
    events = server.receive_data(_raw_frame(0x1, 0x5, 5, _literals([("x", "y")])))
    assert [type(e) for e in events] == [WindowUpdated, StreamReset]  # its handler may run
    assert server.data_to_send() == _raw_frame(0x3, 0x0, 5, b"\0\0\0\x05")
    # HEADERS without any pseudo-header field opening a stream: malformed.
    assert server.receive_data(_raw_frame(0x1, 0x5, 7, _literals([("a", "b")]))) == []
    assert server.data_to_send() == _raw_frame(0x3, 0x0, 7, b"\0\0\0\x01")


@pytest.mark.parametrize("header", [("x-id-bin", "é"), ("x", "a\r\nb"), ("a b", "c")])
def test_bad_header_characters_reset_the_stream(header: tuple[str, str]) -> None:
    server, _ = _pair()
    block = _literals(REQUEST) + bytes((0, len(header[0]))) + header[0].encode() + bytes(
        (len(header[1].encode()),)) + header[1].encode()
    assert server.receive_data(_raw_frame(0x1, 0x5, 1, block)) == []
    assert server.data_to_send() == _raw_frame(0x3, 0x0, 1, b"\0\0\0\x01")


@pytest.mark.parametrize("timeout", ["²S", "123456789S", "5x", "S"])
def test_a_timeout_that_is_not_one_is_ignored(timeout: str) -> None:
    server, client = _pair()
    client.send_headers(1, [*REQUEST, ("grpc-timeout", timeout)], end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, RequestEnded]
    assert events[0].timeout is None


def _compressed(payload: bytes) -> bytes:
    return struct.pack(">?I", True, len(payload)) + payload


def _trailers(seen: list[object]) -> dict[bytes, bytes]:
    headers = [e.headers for e in seen
               if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived)]
    return dict(headers[-1])


@pytest.mark.parametrize(("encoding", "body", "status", "words"), [
    ("gzip", gzip.compress(b"x" * (33 << 20)), b"8", b"decompresses%20to%20over"),
    ("gzip", b"not gzip", b"13", b"corrupt"),
    ("br", b"whatever", b"12", b"not%20supported"),
    # Flagged compressed without an encoding: INTERNAL (as grpc-go answers).
    ("identity", gzip.compress(b"{}"), b"13", b"no%20grpc-encoding"),
    (None, gzip.compress(b"{}"), b"13", b"no%20grpc-encoding"),
])
def test_compressed_messages_are_bounded_and_refused_with_a_status(
        encoding: str | None, body: bytes, status: bytes, words: bytes) -> None:
    server, client = _pair()
    client.send_headers(1, [*REQUEST, *([("grpc-encoding", encoding)] if encoding else [])])
    client.send_data(1, _compressed(body), end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, RequestEnded, WindowUpdated]
    trailers = _trailers(client.receive_data(server.data_to_send()))
    assert trailers[b"grpc-status"] == status and words in trailers[b"grpc-message"]
    # What the handler is told (for a write's audit line): the status the client got.
    assert events[1].refused.status_code == StatusCode(int(status))
    assert (events[1].refused.status_message
            == urllib.parse.unquote(trailers[b"grpc-message"].decode()))
    assert not server._streams
    assert server._received == len(_compressed(body))  # credited back to the connection


@settings(max_examples=300, deadline=None)
@given(payloads=st.lists(st.binary(max_size=40), max_size=6),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       paddings=st.lists(st.integers(min_value=0, max_value=255), min_size=13, max_size=13))
def test_messages_are_read_whatever_the_frames_and_their_padding(
        payloads: list[bytes], cuts: list[int], paddings: list[int]) -> None:
    """Messages cut anywhere across DATA frames (several in one, one across several, empty
    frames, frames shorter than a prefix), each frame with padding: every message comes out
    once and whole, and every flow-controlled byte is counted to a message or still held."""
    data = b"".join(_message(p) for p in payloads)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    frames = [data[a:b] for a, b in itertools.pairwise(bounds)] + [b""]
    reader = _MessageReader(None, 1 << 20)
    seen: list[bytes] = []
    credited = received = 0
    for frame, padding in zip(frames, paddings, strict=False):
        received += len(frame) + padding
        for message, length in reader.feed(frame, len(frame) + padding):
            assert length >= len(message) + 5
            seen.append(message)
            credited += length
    assert seen == payloads
    assert credited + reader._flow == received and reader._flow <= sum(paddings)
    assert reader._size == 0 and not reader._chunks


def test_a_message_over_the_limit_is_refused_once_its_length_is_known() -> None:
    reader = _MessageReader(None, 100)
    assert reader.feed(b"\x00\x00", 2) == []
    with pytest.raises(MessageTooLargeError, match="101 > 100"):
        reader.feed(b"\x00\x00\x65", 3)
    assert _MessageReader(None, 100).feed(_message(b"x" * 100), 105) == [(b"x" * 100, 105)]


def test_a_gzip_message_is_read() -> None:
    server, client = _pair()
    client.send_headers(1, [*REQUEST, ("grpc-encoding", "gzip")])
    client.send_data(1, _compressed(gzip.compress(b"hello")), end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, MessageReceived, RequestEnded]
    assert events[1].data == b"hello"


def test_a_message_over_the_limit_is_refused_on_its_stream_only() -> None:
    server, client = _pair()
    client.send_headers(1, REQUEST)
    client.send_data(1, struct.pack(">?I", False, (32 << 20) + 1) + b"x" * 100)
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [RequestReceived, RequestEnded, WindowUpdated]
    trailers = _trailers(client.receive_data(server.data_to_send()))
    assert trailers[b"grpc-status"] == b"8"
    client.send_headers(3, REQUEST, end_stream=True)
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [
        RequestReceived, RequestEnded]


def test_a_reset_upload_gives_its_bytes_back_to_the_connection() -> None:
    server, client = _pair()
    client.send_headers(1, REQUEST)
    client.send_data(1, struct.pack(">?I", False, 100_000) + b"x" * 50_000)
    server.receive_data(client.data_to_send())
    assert server._received == 0
    client.reset_stream(1)
    server.receive_data(client.data_to_send())
    assert server._received == 50_005


async def test_a_connection_that_ends_ends_its_waiting_calls() -> None:
    """Over a real socket: a call still waiting for its request when the client goes away is
    cancelled, and the server closes the connection; after a protocol error too."""
    seen: list[tuple[str, str]] = []
    observed = trio.Event()

    def observe(method: str, code: str, seconds: float) -> None:
        seen.append((method, code))
        observed.set()

    async def echo(raw: bytes, request: object) -> bytes:
        return raw

    server = GrpcServer({"pkg.Service/Method": Method(unary=echo)}, max_request_bytes=1 << 20,
                        observe=observe)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        for ending in (b"", _raw_frame(0x6, 0x0, 0, b"1234")):  # EOF; a PING of 4 bytes
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            client.send_headers(1, REQUEST)  # and no message
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            await sock.send_all(client.data_to_send())
            await trio.testing.wait_all_tasks_blocked(0.05)
            with trio.fail_after(10):
                if ending:
                    await sock.send_all(ending)
                    while await sock.receive_some():  # GOAWAY, then the server closes
                        pass
                else:
                    await sock.send_eof()
                await observed.wait()
            observed = trio.Event()
            await sock.aclose()
        nursery.cancel_scope.cancel()
    assert seen == [("Method", "CANCELLED"), ("Method", "CANCELLED")]


async def test_work_after_the_reply_runs_once_whether_or_not_the_reply_went() -> None:
    """`after_reply` actions (the audit line of a write) run after the reply is written; when
    the client goes away first they still run, and one that fails does not stop the server."""
    ran: list[bytes] = []
    release = trio.Event()  # never set: the "wait" call waits until its client goes away
    waited = trio.Event()

    returned: set[bytes] = set()

    def note(raw: bytes) -> None:
        assert raw in returned or raw == b"wait"  # not before the handler had its reply
        ran.append(raw)
        if raw == b"wait":
            waited.set()

    async def handler(raw: bytes, request: RequestReceived) -> bytes:
        after_reply(request, lambda: note(raw))
        if raw == b"fail":
            after_reply(request, lambda: 1 / 0)
        if raw == b"wait":
            await release.wait()
        returned.add(raw)
        return raw

    async def send_and_read(port: int, message: bytes, *, hang_up: bool = False) -> bytes:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, REQUEST)
        client.send_data(1, struct.pack(">?I", False, len(message)) + message, end_stream=True)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(client.data_to_send())
        body = b""
        with trio.fail_after(10):
            if hang_up:
                await trio.testing.wait_all_tasks_blocked(0.05)
                await sock.send_eof()
                while await sock.receive_some():
                    pass
            else:
                ended = False
                while not ended:
                    data = await sock.receive_some()
                    assert data, "the server closed the connection before the reply"
                    for event in client.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            body += event.data
                        ended = ended or isinstance(event, h2.events.StreamEnded)
        await sock.aclose()
        return body[5:]

    server = GrpcServer({"pkg.Service/Method": Method(unary=handler)}, max_request_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        assert await send_and_read(port, b"one") == b"one"
        assert ran == [b"one"]  # in the same scheduler step as the reply's write
        assert await send_and_read(port, b"fail") == b"fail"
        await send_and_read(port, b"wait", hang_up=True)
        with trio.fail_after(10):
            await waited.wait()
        assert await send_and_read(port, b"two") == b"two"
        nursery.cancel_scope.cancel()
    assert ran == [b"one", b"fail", b"wait", b"two"]


async def test_a_reply_larger_than_the_window_arrives_whole_as_the_client_opens_it() -> None:
    """A client that opens the window bit by bit (h2's defaults: 64 KiB windows, 16 KiB frames)
    gets a 1 MiB unary reply in window-sized DATA frames, whole and in order."""
    body = bytes(range(256)) * 4096

    async def big(raw: bytes, request: RequestReceived) -> bytes:
        return body

    server = GrpcServer({"pkg.Service/Method": Method(unary=big)}, max_request_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, REQUEST)
        client.send_data(1, struct.pack(">?I", False, 0), end_stream=True)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(client.data_to_send())
        received = bytearray()
        frames = 0
        trailers: dict[bytes, bytes] = {}
        with trio.fail_after(30):
            while not trailers:
                data = await sock.receive_some()
                assert data, "the server closed the connection before the reply"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        assert event.flow_controlled_length <= 65_535
                        received += event.data
                        frames += 1
                        client.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = dict(event.headers)
                await sock.send_all(client.data_to_send())
        await sock.aclose()
        nursery.cancel_scope.cancel()
    assert trailers[b"grpc-status"] == b"0"
    assert bytes(received) == struct.pack(">?I", False, len(body)) + body
    assert frames >= len(body) // 16_384


async def test_a_call_the_connection_refuses_is_counted_with_the_status_it_got() -> None:
    """Over a real socket: a message the connection cannot read is answered by the connection
    (here UNIMPLEMENTED, an unknown compression); the handler is not run, and the call's
    metrics carry that status, not one of the handler's."""
    seen: list[tuple[str, str]] = []
    observed = trio.Event()

    def observe(method: str, code: str, seconds: float) -> None:
        seen.append((method, code))
        observed.set()

    async def handler(raw: bytes, request: RequestReceived) -> bytes:
        raise AssertionError("the handler ran for a refused call")

    server = GrpcServer({"pkg.Service/Method": Method(unary=handler)}, max_request_bytes=1 << 20,
                        observe=observe)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, [*REQUEST, ("grpc-encoding", "br")])
        client.send_data(1, _compressed(b"whatever"), end_stream=True)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(client.data_to_send())
        trailers: dict[bytes, bytes] = {}  # a trailers-only response: headers that end it
        ended = False
        with trio.fail_after(10):
            while not ended:
                data = await sock.receive_some()
                assert data, "the server closed the connection before answering"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        trailers.update(event.headers)
                    ended = ended or isinstance(event, h2.events.StreamEnded)
            await observed.wait()
        await sock.aclose()
        nursery.cancel_scope.cancel()
    assert trailers[b"grpc-status"] == b"12"
    assert seen == [("Method", "UNIMPLEMENTED")]


async def test_calls_reset_while_their_handlers_run_are_bounded_per_connection() -> None:
    """Rapid reset: a reset frees its stream at once, so a client resetting calls in a loop
    would have the server run any number at once. With `max_reset_running` handlers still
    running for reset calls, the connection refuses new calls (REFUSED_STREAM, nothing run)
    until one finishes; then it serves them again."""
    release = trio.Event()
    started: list[bytes] = []
    both_started = trio.Event()

    async def handler(raw: bytes, request: RequestReceived) -> bytes:
        started.append(raw)
        if len(started) == 2:
            both_started.set()
        await release.wait()  # e.g. an append waiting for its commit: a reset does not stop it
        return raw

    server = GrpcServer({"pkg.Service/Method": Method(unary=handler)}, max_request_bytes=1 << 20,
                        max_reset_running=2)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()

    def call(stream_id: int, body: bytes) -> None:
        client.send_headers(stream_id, REQUEST)
        client.send_data(stream_id, struct.pack(">?I", False, len(body)) + body,
                         end_stream=True)

    async def events_until(sock: trio.SocketStream, done: type) -> list[h2.events.Event]:
        seen: list[h2.events.Event] = []
        while not any(isinstance(e, done) for e in seen):
            data = await sock.receive_some()
            assert data, "the server closed the connection"
            seen += client.receive_data(data)
            await sock.send_all(client.data_to_send())
        return seen

    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            for stream_id, body in ((1, b"a"), (3, b"b")):
                call(stream_id, body)
            await sock.send_all(client.data_to_send())
            await both_started.wait()
            client.reset_stream(1)
            client.reset_stream(3)
            call(5, b"c")  # two handlers still run for reset calls: refused
            await sock.send_all(client.data_to_send())
            seen = await events_until(sock, h2.events.StreamReset)
            reset = [e for e in seen if isinstance(e, h2.events.StreamReset)]
            assert [(e.stream_id, e.error_code) for e in reset] == [
                (5, h2.errors.ErrorCodes.REFUSED_STREAM)]
            assert sorted(started) == [b"a", b"b"]
            release.set()  # the reset calls' handlers finish
            await trio.testing.wait_all_tasks_blocked(0.05)
            call(7, b"d")
            await sock.send_all(client.data_to_send())
            seen = await events_until(sock, h2.events.StreamEnded)
            assert [e.stream_id for e in seen if isinstance(e, h2.events.StreamEnded)] == [7]
            assert sorted(started) == [b"a", b"b", b"d"]
        await sock.aclose()
        nursery.cancel_scope.cancel()


async def test_a_streaming_call_ends_when_its_client_resets_it() -> None:
    """A subscription waiting for its next item ends at once when its client resets it (not
    at its next send), so it stops counting against the connection's reset calls at once."""
    seen: list[tuple[str, str]] = []
    observed = trio.Event()

    def observe(method: str, code: str, seconds: float) -> None:
        seen.append((method, code))
        observed.set()

    async def forever(raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        await trio.sleep_forever()
        yield raw  # never reached

    async def echo(raw: bytes, request: RequestReceived) -> bytes:
        return raw

    server = GrpcServer({"pkg.Service/Method": Method(stream=forever),
                         "pkg.Service/Echo": Method(unary=echo)},
                        max_request_bytes=1 << 20, observe=observe, max_reset_running=1)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            client.send_headers(1, REQUEST)
            client.send_data(1, struct.pack(">?I", False, 1) + b"s", end_stream=True)
            await sock.send_all(client.data_to_send())
            while not any(isinstance(e, h2.events.ResponseReceived)  # its headers: it runs
                          for e in client.receive_data(await sock.receive_some())):
                pass
            client.reset_stream(1)
            await sock.send_all(client.data_to_send())
            await observed.wait()
            assert seen == [("Method", "CANCELLED")]
            # Nothing runs for a reset call any more: a new call is served, not refused.
            echo_request = [(n, "/pkg.Service/Echo" if n == ":path" else v) for n, v in REQUEST]
            client.send_headers(3, echo_request)
            client.send_data(3, struct.pack(">?I", False, 1) + b"e", end_stream=True)
            await sock.send_all(client.data_to_send())
            ended: list[h2.events.Event] = []
            while not any(isinstance(e, h2.events.StreamEnded) for e in ended):
                ended += client.receive_data(await sock.receive_some())
            assert not any(isinstance(e, h2.events.StreamReset) for e in ended)
        await sock.aclose()
        nursery.cancel_scope.cancel()


def test_a_priority_frame_of_the_wrong_size_resets_its_stream_only() -> None:
    """RFC 9113 §6.3: a stream error (FRAME_SIZE_ERROR), not the connection's."""
    server, client = _pair()
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    events = server.receive_data(_raw_frame(0x2, 0x0, 1, b"\0\0\0\1"))
    assert [(type(e), e.stream_id) for e in events] == [
        (RequestEnded, 1), (WindowUpdated, 1), (StreamReset, 1)]
    seen = client.receive_data(server.data_to_send())
    assert [(e.stream_id, e.error_code) for e in seen if isinstance(e, h2.events.StreamReset)
            ] == [(1, h2.errors.ErrorCodes.FRAME_SIZE_ERROR)]
    client.send_headers(3, REQUEST, end_stream=True)  # the connection goes on
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [
        RequestReceived, RequestEnded]


# A client that reads slowly, and resets while the server waits to write: raw frames over a real
# socket with a small receive buffer and the largest windows HTTP/2 allows.

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HUGE_WINDOWS = (
    _raw_frame(0x4, 0x0, 0, struct.pack(">HIHI", 0x4, 2**31 - 1, 0x5, 2**24 - 1))
    + _raw_frame(0x8, 0x0, 0, struct.pack(">I", 2**31 - 1 - 65_535)))


def _call(stream_id: int, path: str, body: bytes) -> bytes:
    headers = [(n, path if n == ":path" else v) for n, v in REQUEST]
    return (_raw_frame(0x1, 0x4, stream_id, _literals(headers))
            + _raw_frame(0x0, 0x1, stream_id, struct.pack(">?I", False, len(body)) + body))


async def _slow_reader(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return sock


async def test_a_call_reset_while_its_reply_waits_for_the_socket_leaves_the_connection_whole(
        ) -> None:
    """A subscription's replies fill the socket (its client reads slowly); the client resets
    it while the server waits to write. The write in progress is finished: the client's other
    calls on the connection are answered, their frames intact (a write cut short had left the
    client a partial frame, and every later byte misread)."""
    chunk = b"\xab" * (1 << 20)

    async def flood(raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        await trio.sleep(0.2)  # the first event comes later: the stream's headers have gone
        for _ in range(64):
            yield chunk

    async def echo(raw: bytes, request: RequestReceived) -> bytes:
        return b"echo:" + raw

    server = GrpcServer({"pkg.Service/Flood": Method(stream=flood),
                         "pkg.Service/Echo": Method(unary=echo)}, max_request_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await _slow_reader(port)
        with trio.fail_after(20):
            await sock.send(_PREFACE + _HUGE_WINDOWS + _call(1, "/pkg.Service/Flood", b"go"))
            await trio.testing.wait_all_tasks_blocked(0.2)  # the server waits for the socket
            await sock.send(_raw_frame(0x3, 0x0, 1, struct.pack(">I", 0x8))  # CANCEL
                            + _call(3, "/pkg.Service/Echo", b"hi"))
            buffer, echoed, ended = b"", b"", False
            while not ended:
                data = await sock.recv(1 << 20)
                assert data, "the server closed the connection"
                buffer += data
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags = buffer[3], buffer[4]
                    stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                    assert stream_id in (0, 1, 3), f"a frame for stream {stream_id}: misread"
                    if kind == 0x0 and stream_id == 1:
                        assert not payload.strip(b"\xab")[5:], "stream 1's DATA is not its own"
                    if kind == 0x0 and stream_id == 3:
                        echoed += payload
                    ended = ended or (stream_id == 3 and kind == 0x1 and bool(flags & 0x1))
        assert echoed[5:] == b"echo:hi"
        sock.close()
        nursery.cancel_scope.cancel()


async def test_a_call_whose_client_reads_nothing_waits_instead_of_buffering() -> None:
    """A client's windows let the server frame up to 2 GiB a stream; a subscription whose
    client does not read waits once the connection owes it about 1 MiB, instead of the server
    holding all of its replies."""
    chunk = b"\xab" * (1 << 20)
    made = 0

    async def flood(raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        nonlocal made
        for _ in range(64):
            made += 1
            yield chunk

    server = GrpcServer({"pkg.Service/Flood": Method(stream=flood)}, max_request_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await _slow_reader(port)
        await sock.send(_PREFACE + _HUGE_WINDOWS + _call(1, "/pkg.Service/Flood", b"go"))
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked(0.5)
        # What the socket buffers hold (a few MiB on loopback), plus about one reply framed.
        assert made < 16, f"{made} replies of 1 MiB made for a client that reads nothing"
        sock.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("offence", [
    _raw_frame(0x8, 0x0, 1, b"\0\0\0\0"),  # WINDOW_UPDATE of 0 on the stream
    _raw_frame(0x2, 0x0, 1, b"\0\0\0\1"),  # PRIORITY of the wrong size
    _raw_frame(0x0, 0x0, 1, b"\0\0\0\0\0"),  # DATA after the request's end
], ids=["window-update-0", "priority-size", "data-after-end"])
async def test_calls_the_server_resets_for_the_client_s_errors_count_as_reset(
        offence: bytes) -> None:
    """Rapid reset by the server's hand: frames that make the server reset a stream free it
    as the client's RST_STREAM does, so they count against `max_reset_running` too."""
    release = trio.Event()
    started: list[bytes] = []
    arrived = {b"a": trio.Event(), b"c": trio.Event()}

    async def handler(raw: bytes, request: RequestReceived) -> bytes:
        started.append(raw)
        arrived[raw].set()
        await release.wait()
        return raw

    server = GrpcServer({"pkg.Service/Method": Method(unary=handler)}, max_request_bytes=1 << 20,
                        max_reset_running=1)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(_PREFACE + _raw_frame(0x4, 0x0, 0, b"")
                            + _call(1, "/pkg.Service/Method", b"a"))
        with trio.fail_after(10):
            await arrived[b"a"].wait()
            await sock.send_all(offence + _call(3, "/pkg.Service/Method", b"b"))
            reset: dict[int, int] = {}
            buffer = b""
            while 3 not in reset:
                data = await sock.receive_some()
                assert data, "the server closed the connection"
                buffer += data
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    length, kind = int.from_bytes(buffer[:3], "big"), buffer[3]
                    stream_id = int.from_bytes(buffer[5:9], "big")
                    if kind == 0x3:  # RST_STREAM
                        reset[stream_id] = int.from_bytes(buffer[9:13], "big")
                    buffer = buffer[9 + length:]
            assert reset[3] == h2.errors.ErrorCodes.REFUSED_STREAM
            assert started == [b"a"]
            release.set()  # the reset call's handler ends; calls are served again
            await trio.testing.wait_all_tasks_blocked(0.05)
            await sock.send_all(_call(5, "/pkg.Service/Method", b"c"))
            await arrived[b"c"].wait()
        await sock.aclose()
        nursery.cancel_scope.cancel()


async def test_a_reset_call_is_uncounted_even_when_purerpc_has_dropped_its_stream() -> None:
    """purerpc's close forgets a stream whose both sides have ended; a reset call whose
    handler ends that way is uncounted all the same (else the connection, having counted it,
    would refuse every new call once `max_reset_running` such calls had ended)."""
    import anyio

    from eventstore.grpc.transport import _Socket

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, await anyio.connect_tcp("127.0.0.1", port) as tcp:
        socket = _Socket(GRPCConfiguration(client_side=False), tcp, max_reset_running=1)
        stream = socket._allocate_stream(1)
        stream.was_reset = True  # as `_listen` marks a call reset while its handler runs
        socket._reset_running = 1
        stream._close_remote()
        stream._close_local()  # what purerpc's close does first: the stream leaves the table
        assert 1 not in socket._streams
        socket.forget(stream)
        assert socket._reset_running == 0


async def test_a_stream_past_its_deadline_ends_deadline_exceeded_and_the_server_goes_on(
        ) -> None:
    """grpc-timeout is the client's deadline: a streaming call (a subscription) still open at
    it ends DEADLINE_EXCEEDED, and stops working for a client that has given up. A unary call
    runs to its end (an append is committed all the same; a read's work cannot be
    interrupted), and one answered in time is not affected."""
    seen: list[tuple[str, str]] = []

    async def unary(raw: bytes, request: RequestReceived) -> bytes:
        if raw == b"late":
            await trio.sleep(0.5)
        return raw

    async def forever(raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        yield raw
        await trio.sleep_forever()

    server = GrpcServer({"pkg.Service/Method": Method(unary=unary),
                         "pkg.Service/Stream": Method(stream=forever)},
                        max_request_bytes=1 << 20,
                        observe=lambda method, code, seconds: seen.append((method, code)))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()

    def call(stream_id: int, path: str, body: bytes, timeout: str) -> None:
        headers = [(n, path if n == ":path" else v) for n, v in REQUEST]
        client.send_headers(stream_id, [*headers, ("grpc-timeout", timeout)])
        client.send_data(stream_id, _message(body), end_stream=True)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        call(1, "/pkg.Service/Stream", b"s", "200m")
        call(3, "/pkg.Service/Method", b"late", "100m")
        call(5, "/pkg.Service/Method", b"fast", "10S")
        await sock.send_all(client.data_to_send())
        statuses: dict[int, bytes] = {}
        with trio.fail_after(10):
            while len(statuses) < 3:
                data = await sock.receive_some()
                assert data, "the server closed the connection"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.TrailersReceived):
                        statuses[event.stream_id] = dict(event.headers)[b"grpc-status"]
                await sock.send_all(client.data_to_send())
        await sock.aclose()
        nursery.cancel_scope.cancel()
    assert statuses == {1: b"4", 3: b"0", 5: b"0"}  # 4: DEADLINE_EXCEEDED
    assert sorted(seen) == [("Method", "OK"), ("Method", "OK"), ("Stream", "DEADLINE_EXCEEDED")]


async def test_a_request_that_never_arrives_in_full_is_let_go() -> None:
    """A client that starts a request and never finishes it would hold its bytes, up to the
    message size limit a call, as long as its connection lasts: past `request_seconds` the call
    ends DEADLINE_EXCEEDED, its stream is reset (the client need not send the rest), and the
    connection goes on serving."""
    seen: list[tuple[str, str]] = []

    async def echo(raw: bytes, request: RequestReceived) -> bytes:
        return raw

    told: list[tuple[str, str]] = []
    method = Method(unary=echo, refused=lambda request, outcome, reason, seconds: told.append(
        (outcome, reason)))
    server = GrpcServer({"pkg.Service/Method": method}, max_request_bytes=1 << 20,
                        request_seconds=0.3,
                        observe=lambda method, code, seconds: seen.append((method, code)))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        client.send_headers(1, REQUEST)
        client.send_data(1, struct.pack(">?I", False, 100_000) + b"x" * 1000)  # 1% of it
        await sock.send_all(client.data_to_send())
        events: list[h2.events.Event] = []
        with trio.fail_after(10):
            while not any(isinstance(e, h2.events.StreamReset) for e in events):
                data = await sock.receive_some()
                assert data, "the server closed the connection"
                events += client.receive_data(data)
            assert _trailers(events)[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED
            assert b"did%20not%20arrive%20in%20full" in _trailers(events)[b"grpc-message"]
            client.send_headers(3, REQUEST)
            client.send_data(3, _message(b"hi"), end_stream=True)
            await sock.send_all(client.data_to_send())
            answered: list[h2.events.Event] = []
            while not any(isinstance(e, h2.events.StreamEnded) for e in answered):
                answered += client.receive_data(await sock.receive_some())
            assert _trailers(answered)[b"grpc-status"] == b"0"
        await sock.aclose()
        nursery.cancel_scope.cancel()
    assert seen == [("Method", "DEADLINE_EXCEEDED"), ("Method", "OK")]
    # The method hears of it (a write's audit line).
    assert told == [("DeadlineExceeded", "the request did not arrive in full within 0.3 s")]


def _parse_frames(buffer: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """Whole frames at the front of `buffer` (kind, flags, stream, payload), and the rest."""
    frames = []
    while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
        length = int.from_bytes(buffer[:3], "big")
        frames.append((buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF,
                       buffer[9:9 + length]))
        buffer = buffer[9 + length:]
    return frames, buffer


async def test_a_server_going_away_says_which_calls_it_took_and_refuses_later_ones() -> None:
    """At shutdown, once its calls are answered, each connection gets GOAWAY (NO_ERROR) with
    the last call it took; a call the client sends after it is refused (REFUSED_STREAM: not
    processed, safe to retry elsewhere), and a connection opened later gets GOAWAY at once."""
    ran: list[bytes] = []

    async def echo(raw: bytes, request: RequestReceived) -> bytes:
        ran.append(raw)
        return raw

    server = GrpcServer({"pkg.Service/Method": Method(unary=echo)}, max_request_bytes=1 << 20)

    async def until(sock: trio.SocketStream, buffer: bytes, kind: int,
                    ) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
        seen: list[tuple[int, int, int, bytes]] = []
        while not any(frame[0] == kind for frame in seen):
            data = await sock.receive_some()
            assert data, "the server closed the connection"
            frames, buffer = _parse_frames(buffer + data)
            seen += frames
        return seen, buffer

    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        with trio.fail_after(10):
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            await sock.send_all(_PREFACE + _raw_frame(0x4, 0x0, 0, b"")
                                + _call(1, "/pkg.Service/Method", b"a"))
            seen, buffer = await until(sock, b"", 0x1)  # its answer's headers
            server.go_away()
            seen, buffer = await until(sock, buffer, 0x7)
            (goaway,) = [f for f in seen if f[0] == 0x7]
            assert struct.unpack(">II", goaway[3][:8]) == (1, 0)  # last stream 1, NO_ERROR
            await sock.send_all(_call(3, "/pkg.Service/Method", b"b"))
            seen, buffer = await until(sock, buffer, 0x3)
            assert [(f[2], int.from_bytes(f[3], "big")) for f in seen if f[0] == 0x3] == [
                (3, 0x7)]  # REFUSED_STREAM
            late = await trio.open_tcp_stream("127.0.0.1", port)
            await late.send_all(_PREFACE + _raw_frame(0x4, 0x0, 0, b""))
            seen, _ = await until(late, b"", 0x7)
            (goaway,) = [f for f in seen if f[0] == 0x7]
            assert struct.unpack(">II", goaway[3][:8]) == (0, 0)
        assert ran == [b"a"]
        await sock.aclose()
        await late.aclose()
        nursery.cancel_scope.cancel()


async def test_a_client_that_sends_calls_but_reads_nothing_gets_few_of_them_run() -> None:
    """Replies wait for a client that does not read, so the connection stops reading that
    client's calls (and starting their handlers) while it owes it over 1 MiB — counting the
    bytes being written, not only those framed (else each call ran and held its reply: 2,000
    calls, 2 GiB)."""
    made = 0

    async def big(raw: bytes, request: RequestReceived) -> bytes:
        nonlocal made
        made += 1
        return b"\xab" * (1 << 20)

    server = GrpcServer({"pkg.Service/Method": Method(unary=big)}, max_request_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await _slow_reader(port)
        await sock.send(_PREFACE + _HUGE_WINDOWS)
        sent = 0
        for i in range(100):
            with trio.move_on_after(0.5):
                await sock.send(_call(1 + 2 * i, "/pkg.Service/Method", b"go"))
                sent += 1
                await trio.testing.wait_all_tasks_blocked(0.01)
                continue
            break  # the client's own socket buffer is full: the server reads no more
        await trio.testing.wait_all_tasks_blocked(0.1)
        assert sent > 20 and made < 16, f"{made} handlers ran for {sent} calls"
        sock.close()
        nursery.cancel_scope.cancel()


def test_a_goaway_after_going_away_keeps_the_last_stream_taken() -> None:
    """RFC 9113 §6.8: the last stream id of a later GOAWAY may not be higher. A protocol error
    after `go_away` names the last stream taken, not the last one refused."""
    server, client = _pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.go_away()
    client.send_headers(3, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())  # refused
    with pytest.raises(Http2ConnectionError):
        server.receive_data(_raw_frame(0x8, 0x0, 0, b"\0\0\0\0"))  # WINDOW_UPDATE of 0
    frames, _ = _parse_frames(server.data_to_send())
    goaways = [struct.unpack(">II", f[3][:8]) for f in frames if f[0] == 0x7]
    assert goaways == [(1, 0), (1, 0x1)]  # NO_ERROR, then PROTOCOL_ERROR; both stream 1


async def test_a_stream_past_its_deadline_in_the_middle_of_a_message_is_reset() -> None:
    """A deadline that passes while a message waits for the client's window ends the call
    with RST_STREAM CANCEL: a status after half a message would be misread."""

    async def large(raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        yield b"\xab" * (1 << 20)  # more than h2's 64 KiB window, which the client never opens

    server = GrpcServer({"pkg.Service/Stream": Method(stream=large)}, max_request_bytes=1 << 20)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    headers = [(n, "/pkg.Service/Stream" if n == ":path" else v) for n, v in REQUEST]
    client.send_headers(1, [*headers, ("grpc-timeout", "200m")])
    client.send_data(1, _message(b"s"), end_stream=True)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(client.data_to_send())
        events: list[h2.events.Event] = []
        with trio.fail_after(10):
            while not any(isinstance(e, h2.events.StreamReset | h2.events.TrailersReceived)
                          for e in events):
                data = await sock.receive_some()
                assert data, "the server closed the connection"
                events += client.receive_data(data)
        await sock.aclose()
        nursery.cancel_scope.cancel()
    assert [(e.stream_id, e.error_code) for e in events
            if isinstance(e, h2.events.StreamReset)] == [(1, h2.errors.ErrorCodes.CANCEL)]
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in events)


async def test_a_client_that_writes_a_large_request_before_reading_is_read() -> None:
    """While a connection owes its client over 1 MiB it starts no new calls, but goes on
    reading: a client that writes a whole large request before it reads (a sequential client)
    would otherwise wait for the server while the server waits for it."""

    async def big(raw: bytes, request: RequestReceived) -> bytes:
        return b"\xab" * (4 << 20)

    async def echo(raw: bytes, request: RequestReceived) -> bytes:
        return b"ok"

    server = GrpcServer({"pkg.Service/Big": Method(unary=big),
                         "pkg.Service/Echo": Method(unary=echo)}, max_request_bytes=16 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sock = await _slow_reader(port)
        await sock.send(_PREFACE + _HUGE_WINDOWS + _call(1, "/pkg.Service/Big", b"go"))
        await trio.testing.wait_all_tasks_blocked(0.2)  # the reply fills the socket
        headers = [(n, "/pkg.Service/Echo" if n == ":path" else v) for n, v in REQUEST]
        body = b"\0" * (8 << 20)
        message = struct.pack(">?I", False, len(body)) + body
        data = memoryview(_raw_frame(0x1, 0x4, 3, _literals(headers)) + b"".join(
            _raw_frame(0x0, 0x1 if at + (1 << 20) >= len(message) else 0x0, 3,
                       message[at:at + (1 << 20)])
            for at in range(0, len(message), 1 << 20)))
        sent = 0
        with trio.move_on_after(10):
            while sent < len(data):
                sent += await sock.send(data[sent:])
        assert sent == len(data), f"the server stopped reading after {sent} bytes"
        sock.close()
        nursery.cancel_scope.cancel()
