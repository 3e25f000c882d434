"""The server side of an HTTP/2 connection carrying gRPC (RFC 9113, RFC 7541), without I/O:
bytes in, purerpc's gRPC events out, and the bytes to send in `data_to_send`.

It stands where purerpc's `GRPCConnection` and the h2 library stood, with the interface
purerpc's sockets and streams call (`receive_data`, `start_response`, `send_data`,
`end_response`, `respond_status`, `flow_control_window`, …). h2 parsed and validated each
request in Python: 140–220 µs of CPU per call, the largest part of a one-event append. Here
the Rust extension cuts the frames and decodes the header blocks (`_es_codec.FrameReader`,
which also checks what a frame and a request's header list can be checked for on their own),
and this class keeps the connection's state: streams, flow-control windows, the client's
settings.

What it sends is HPACK without the dynamic table (literals "without indexing"), so its
header blocks are valid in any state of the connection and the common ones are ready-made.

Errors: a connection error (RFC 9113 §5.4.1) queues GOAWAY and raises `Http2ConnectionError`
(nothing else escapes `receive_data`); a stream error queues RST_STREAM and the connection goes
on. A request that is well-formed HTTP/2 but not gRPC is answered: 405 for a method other than
POST, 415 for a content type other than application/grpc, RESOURCE_EXHAUSTED for headers over
the advertised size. A request message that cannot be read gets a status of its own:
RESOURCE_EXHAUSTED over the message size limit (after decompression too), UNIMPLEMENTED for an
unknown compression, INTERNAL for corrupt compressed data.
"""

from __future__ import annotations

import base64
import struct
import urllib.parse
import zlib
from datetime import timedelta
from typing import Any

from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import (
    MessageTooLargeError,
    ProtocolError,
    StreamClosedError,
    UnsupportedMessageEncodingError,
)
from purerpc.grpclib.headers import sanitize_headers
from purerpc.grpclib.status import Status, StatusCode

from eventstore._es_codec import FrameReader, Http2Error

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x2, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4

# Error codes (§7).
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = (
    0x0, 0x1, 0x3, 0x5, 0x6)
REFUSED_STREAM, CANCEL = 0x7, 0x8

# Settings (§6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384

# What this side advertises: purerpc's settings (many streams, large windows and frames), and a
# header list size that the frame reader enforces.
OUR_MAX_CONCURRENT_STREAMS = 2**16
OUR_MAX_FRAME_SIZE = 2**24 - 1
OUR_MAX_HEADER_LIST_SIZE = 16_384
OUR_HEADER_TABLE_SIZE = 4_096  # the default: the client's encoder may use it
# The connection's receive window is opened this far at once, and topped up when half is used.
CONNECTION_WINDOW = 2**30


class StreamReset:
    """An event: a stream was reset while open — by its client (RST_STREAM), or by this side
    for the client's error on it (bad flow control, frames after its end, bad trailers, a
    PRIORITY frame of the wrong size). Its handler may still be running; the transport counts
    such handlers (see `eventstore.grpc.transport`): a client must not be able to free streams
    faster than their handlers end, whichever side sends the reset."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


_FRAME_HEADER = struct.Struct(">IBI")  # 24-bit length and 8-bit type as one int, flags, stream
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")

# Ready-made header blocks, literals without indexing: ":status: 200" is static entry 8,
# content-type is static name 31.
_OK_HEADERS = {
    "+proto": b"\x88\x0f\x10\x16application/grpc+proto",
    "": b"\x88\x0f\x10\x10application/grpc",
}
_OK_TRAILERS = b"\x00\x0bgrpc-status\x010"
_TABLE_SIZE_ZERO = b"\x20"  # a dynamic table size update to 0 (RFC 7541 §6.3)
_STATUS_405 = b"\x08\x03405"
_STATUS_415 = b"\x08\x03415"

# The request's header fields purerpc's event has attributes for; the rest is metadata.
_REQUEST_FIELDS = frozenset((
    ":method", ":scheme", ":path", ":authority", "content-type", "te", "user-agent",
    "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "grpc-message-type"))

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class Http2ConnectionError(ProtocolError):  # type: ignore[misc]  # purerpc is untyped
    """A connection error: GOAWAY is queued in `data_to_send`; send it, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"HTTP/2 connection error {code:#x}: {message}")
        self.code = code


class _Stream:
    __slots__ = ("buffer", "headers_sent", "local_open", "received", "recv_window",
                 "remote_open", "send_window", "undelivered")

    def __init__(self, send_window: int, recv_window: int, buffer: _MessageReader) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.received = 0  # bytes consumed since the last WINDOW_UPDATE for this stream
        # Flow-controlled bytes received but not yet handed over in a MessageReceived (whose
        # reader acknowledges them): credited back to the connection when the stream goes.
        self.undelivered = 0
        self.remote_open = True
        self.local_open = True
        self.headers_sent = False
        self.buffer = buffer


class _MessageReader:
    """A stream's gRPC messages (a flag byte, a 4-byte length, the message) out of its DATA
    frames. A request usually comes whole in one frame: it is cut out with one slice (purerpc's
    MessageReadBuffer queued every frame and copied every message twice: 4.2 µs a message
    warm, here 1.7).
    The message size limit is checked as soon as a length is known, and again after
    decompression (purerpc bounded only the compressed length); gzip is read as gzip (purerpc
    read it as zlib)."""

    __slots__ = ("_chunks", "_encoding", "_flow", "_max", "_need", "_size")

    def __init__(self, encoding: str | None, max_length: int) -> None:
        self._encoding = encoding
        self._max = max_length
        self._chunks: list[bytes] = []  # the bytes of an unfinished message
        self._size = 0  # their length
        self._need: int | None = None  # the unfinished message's length, prefix included
        self._flow = 0  # flow-controlled bytes received and not yet counted to a message

    def feed(self, data: bytes, flow_len: int) -> list[tuple[bytes, int]]:
        """The messages a DATA frame's `data` completes, each with the flow-controlled bytes
        it accounts for (`flow_len` includes the frame's padding: it goes with the first
        message that completes; bytes of an unfinished message wait for the next frames).
        Raises MessageTooLargeError, UnsupportedMessageEncodingError or _BadMessage."""
        self._flow += flow_len
        if self._chunks or (data and len(data) < 5):
            self._chunks.append(data)
            self._size += len(data)
            if self._need is None and self._size >= 5:
                head = b"".join(self._chunks)  # short: only until the prefix is in
                self._chunks = [head]
                self._need = self._length(head, 0)
            if self._need is None or self._size < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks, self._size, self._need = [], 0, None
        messages: list[tuple[bytes, int]] = []
        start, end = 0, len(data)
        while end - start >= 5:
            need = self._length(data, start)
            if end - start < need:
                break
            message = data[start + 5:start + need]
            if data[start]:
                message = self._decompress(message)
            messages.append((message, need))
            start += need
        if messages:
            # The padding and the bytes received before this frame go with the first.
            first, length = messages[0]
            messages[0] = (first, length + self._flow - len(data))
            self._flow = end - start
        if start < end:
            rest = data[start:]
            self._chunks, self._size = [rest], len(rest)
            self._need = self._length(rest, 0) if len(rest) >= 5 else None
        return messages

    def _length(self, data: bytes, start: int) -> int:
        """The length, prefix included, of the message whose prefix is at `start`."""
        length = int.from_bytes(data[start + 1:start + 5], "big")
        if length > self._max:
            raise MessageTooLargeError(
                f"Received message larger than max: {length} > {self._max}")
        return length + 5

    def _decompress(self, data: bytes) -> bytes:
        if self._encoding in (None, "identity"):
            # The protocol: the flag must be 0 without an encoding (grpc-go: INTERNAL too).
            raise _BadMessage(StatusCode.INTERNAL, "the message is flagged compressed but "
                              "the request has no grpc-encoding")
        wbits = {"gzip": 31, "deflate": 15}.get(self._encoding)
        if wbits is None:
            raise UnsupportedMessageEncodingError(
                f"message encoding {self._encoding!r} is not supported")
        inflater = zlib.decompressobj(wbits)
        try:
            out: bytes = inflater.decompress(data, self._max + 1)
        except zlib.error as error:
            raise _BadMessage(StatusCode.INTERNAL, f"the compressed message is corrupt: "
                              f"{error}") from None
        if len(out) > self._max or inflater.unconsumed_tail:
            raise MessageTooLargeError(f"message decompresses to over {self._max} bytes")
        return out


class _BadMessage(Exception):
    """A request message that cannot be read: its call is answered with `code`."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ServerConnection:
    """One HTTP/2 server connection's state. See the module's docstring."""

    def __init__(self, config: GRPCConfiguration) -> None:
        self.config = config
        self._reader = FrameReader(OUR_MAX_FRAME_SIZE, OUR_HEADER_TABLE_SIZE,
                                   OUR_MAX_HEADER_LIST_SIZE)
        self._out = bytearray()
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        # Outbound: the connection window and what the client's settings say.
        self._send_window = DEFAULT_WINDOW
        self._initial_window = DEFAULT_WINDOW
        self.max_outbound_frame_size = DEFAULT_FRAME_SIZE
        self._table_size_update = False
        # Inbound: streams open with our INITIAL_WINDOW_SIZE; the connection's window.
        self._our_initial_window = min(2 * config.max_message_length, MAX_WINDOW)
        self._recv_window = DEFAULT_WINDOW
        self._received = 0  # bytes consumed since the last connection WINDOW_UPDATE
        self._goaway_sent = False
        # Set by `go_away`: the last stream this connection takes (later ones are refused).
        self._last_taken: int | None = None

    # ----------------------------------------------------------------- purerpc's interface

    def initiate_connection(self) -> None:
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (MAX_CONCURRENT_STREAMS, OUR_MAX_CONCURRENT_STREAMS),
            (INITIAL_WINDOW_SIZE, self._our_initial_window),
            (MAX_FRAME_SIZE, OUR_MAX_FRAME_SIZE),
            (MAX_HEADER_LIST_SIZE, OUR_MAX_HEADER_LIST_SIZE),
        ))
        self._frame(SETTINGS, 0, 0, settings)
        self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW))
        self._recv_window += CONNECTION_WINDOW

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def bytes_to_send(self) -> int:
        return len(self._out)

    def go_away(self) -> None:
        """The server is stopping: GOAWAY (NO_ERROR) with the last stream it has taken. The
        streams open go on to their end; the client opens new ones elsewhere, and knows that
        none above that id was processed (RFC 9113 §6.8). Later ones are refused."""
        if self._goaway_sent or self._last_taken is not None:
            return
        self._last_taken = self._last_stream_id
        self._frame(GOAWAY, 0, 0, _GOAWAY.pack(self._last_taken, NO_ERROR))

    def unsend(self, data: bytes) -> None:
        """Put back bytes taken by `data_to_send` that could not be sent: they go first."""
        self._out[:0] = data

    def data_to_send(self, amount: int | None = None) -> bytes:
        if amount is not None and amount < len(self._out):
            data = bytes(self._out[:amount])
            del self._out[:amount]
            return data
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> list[Any]:
        """purerpc's events for what `data` completes. Raises `Http2ConnectionError` (GOAWAY
        queued) when the client broke the protocol; the connection must then end."""
        if self._goaway_sent:
            return []
        try:
            frames = self._reader.feed(data)
        except Http2Error as error:
            code, message = error.args
            raise self._connection_error(code, message) from None
        events: list[Any] = []
        for frame in frames:
            kind = frame[0]
            if kind == DATA:
                self._on_data(frame[1], frame[2], frame[3], frame[4], events)
            elif kind == HEADERS:
                self._on_headers(frame[1], frame[2], frame[3], frame[4], frame[5], events)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(frame[1], _U32.unpack(frame[3])[0] & MAX_WINDOW, events)
            elif kind == SETTINGS:
                if not frame[2] & ACK:
                    self._on_settings(frame[3], events)
            elif kind == PING:
                if not frame[2] & ACK:
                    self._frame(PING, ACK, 0, frame[3])
            elif kind == RST_STREAM:
                self._on_reset(frame[1], events)
            elif kind == PRIORITY:  # the frame reader passes up only one of the wrong size
                stream = self._streams.get(frame[1])
                if stream is not None:  # a stream error (§6.3); others have nothing to reset
                    self._reset(frame[1], stream, FRAME_SIZE_ERROR, events)
            # GOAWAY: the client closes the connection when its calls are done.
        return events

    def flow_control_window(self, stream_id: int) -> int:
        stream = self._open_stream(stream_id)
        return min(self.max_outbound_frame_size, self._send_window, stream.send_window)

    def acknowledge_received_data(self, stream_id: int, flow_controlled_length: int) -> None:
        """Top the windows up once half of them is used: a unary request never costs a
        WINDOW_UPDATE."""
        self._received += flow_controlled_length
        if self._received >= CONNECTION_WINDOW // 2:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._received))
            self._recv_window += self._received
            self._received = 0
        stream = self._streams.get(stream_id)
        if stream is not None and stream.remote_open:
            stream.received += flow_controlled_length
            if stream.received >= self._our_initial_window // 2:
                self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.received))
                stream.recv_window += stream.received
                stream.received = 0

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """One DATA frame; the caller keeps within `flow_control_window`."""
        stream = self._open_stream(stream_id)
        size = len(data)
        if size > min(self.max_outbound_frame_size, self._send_window, stream.send_window):
            raise ValueError(f"{size} bytes of DATA do not fit the flow-control window")
        self._send_window -= size
        stream.send_window -= size
        self._out += _FRAME_HEADER.pack(size << 8 | DATA, END_STREAM if end_stream else 0,
                                        stream_id)
        self._out += data
        if end_stream:
            self._close_local(stream_id, stream)

    def start_response(self, stream_id: int, content_type_suffix: str = "",
                       custom_metadata: Any = ()) -> None:
        stream = self._open_stream(stream_id)
        block = _OK_HEADERS.get(content_type_suffix)
        if block is None or custom_metadata or self._encodings():
            block = _encode([(":status", "200"), *self._response_headers(content_type_suffix),
                             *sanitize_headers(custom_metadata)])
        self._headers(stream_id, stream, block, end_stream=False)

    def end_response(self, stream_id: int, status: Status, custom_metadata: Any = ()) -> None:
        stream = self._open_stream(stream_id)
        if status.int_value == 0 and not status.status_message and not custom_metadata:
            block = _OK_TRAILERS
        else:
            block = _encode([*_status_headers(status), *sanitize_headers(custom_metadata)])
        self._headers(stream_id, stream, block, end_stream=True)

    def respond_status(self, stream_id: int, status: Status, content_type_suffix: str = "",
                       custom_metadata: Any = ()) -> None:
        """A trailers-only response."""
        stream = self._open_stream(stream_id)
        block = _encode([(":status", "200"), *self._response_headers(content_type_suffix),
                         *_status_headers(status), *sanitize_headers(custom_metadata)])
        self._headers(stream_id, stream, block, end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._reset(stream_id, stream, int(error_code), [])

    # ----------------------------------------------------------------------- inbound

    def _on_headers(self, stream_id: int, end_stream: bool, headers: list[tuple[str, str]],
                    problem: str | None, has_pseudo: bool, events: list[Any]) -> None:
        if stream_id % 2 == 0:
            raise self._connection_error(PROTOCOL_ERROR, "HEADERS on an even stream")
        if stream_id <= self._last_stream_id:
            stream = self._streams.get(stream_id)
            if stream is None or not stream.remote_open:
                # Closed, or never opened (a client may not go back to a lower id): the
                # client is told, its connection goes on (§5.1).
                self._frame(RST_STREAM, 0, stream_id, _U32.pack(STREAM_CLOSED))
                if stream is not None:
                    self._drop(stream_id, stream, events)
                return
            # Trailers: they end the request, and carry nothing gRPC reads.
            if has_pseudo or problem is not None or not end_stream:
                self._reset(stream_id, stream, PROTOCOL_ERROR, events)
                return
            self._close_remote(stream_id, stream, events)
            return
        self._last_stream_id = stream_id
        if problem is not None or not has_pseudo:
            if problem is not None and problem.startswith("the header list is over"):
                self._frame(HEADERS, END_HEADERS | END_STREAM, stream_id, self._block(_encode([
                    (":status", "200"), ("content-type", "application/grpc"),
                    *_status_headers(Status(StatusCode.RESOURCE_EXHAUSTED,
                                            f"request headers over {OUR_MAX_HEADER_LIST_SIZE} "
                                            "bytes"))])))
                if not end_stream:  # else the stream is closed: nothing more may be sent on it
                    self._frame(RST_STREAM, 0, stream_id, _U32.pack(NO_ERROR))
            else:
                self._frame(RST_STREAM, 0, stream_id, _U32.pack(PROTOCOL_ERROR))
            return
        if len(self._streams) >= OUR_MAX_CONCURRENT_STREAMS or self._last_taken is not None:
            self._frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM))
            return
        request = _request(stream_id, headers)
        if request is None:
            self._frame(RST_STREAM, 0, stream_id, _U32.pack(PROTOCOL_ERROR))
            return
        if isinstance(request, bytes):
            # Not a gRPC request: an HTTP status of its own, and the stream is done.
            self._frame(HEADERS, END_HEADERS | END_STREAM, stream_id, self._block(request))
            if not end_stream:
                self._frame(RST_STREAM, 0, stream_id, _U32.pack(NO_ERROR))
            return
        stream = _Stream(self._initial_window, self._our_initial_window,
                         _MessageReader(request.message_encoding,
                                        self.config.max_message_length))
        self._streams[stream_id] = stream
        events.append(request)
        if end_stream:
            self._close_remote(stream_id, stream, events)

    def _on_data(self, stream_id: int, end_stream: bool, data: bytes, flow_len: int,
                 events: list[Any]) -> None:
        self._recv_window -= flow_len
        if self._recv_window < 0:
            raise self._connection_error(FLOW_CONTROL_ERROR, "DATA beyond the window")
        if stream_id > self._last_stream_id:
            raise self._connection_error(PROTOCOL_ERROR, "DATA on a stream not opened")
        stream = self._streams.get(stream_id)
        if stream is None or not stream.remote_open:
            # Closed or reset (in flight when it closed), or never opened: ignored, but its
            # bytes still count for the connection's window.
            self.acknowledge_received_data(0, flow_len)
            if stream is not None:  # the client had ended its request (§5.1)
                self._reset(stream_id, stream, STREAM_CLOSED, events)
            return
        stream.undelivered += flow_len
        stream.recv_window -= flow_len
        if stream.recv_window < 0:
            self._reset(stream_id, stream, FLOW_CONTROL_ERROR, events)
            return
        try:
            for message, length in stream.buffer.feed(data, flow_len):
                stream.undelivered -= length
                events.append(MessageReceived(stream_id, message, length))
        except MessageTooLargeError as error:
            self._refuse(stream_id, stream, StatusCode.RESOURCE_EXHAUSTED, str(error), events,
                         end_stream)
            return
        except UnsupportedMessageEncodingError as error:
            self._refuse(stream_id, stream, StatusCode.UNIMPLEMENTED,
                         f"{error}; send messages uncompressed", events, end_stream)
            return
        except _BadMessage as error:
            self._refuse(stream_id, stream, error.code, str(error), events, end_stream)
            return
        if end_stream:
            self._close_remote(stream_id, stream, events)

    def _on_window_update(self, stream_id: int, increment: int, events: list[Any]) -> None:
        if stream_id == 0:
            if increment == 0:
                raise self._connection_error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise self._connection_error(FLOW_CONTROL_ERROR, "window over 2^31-1")
            events.append(WindowUpdated(0, increment))
            return
        if stream_id > self._last_stream_id:
            raise self._connection_error(PROTOCOL_ERROR, "WINDOW_UPDATE on a stream not opened")
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if increment == 0:
            self._reset(stream_id, stream, PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset(stream_id, stream, FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(stream_id, increment))

    def _on_settings(self, payload: bytes, events: list[Any]) -> None:
        initial_window = None
        for key, value in _SETTING.iter_unpack(payload):
            if key == HEADER_TABLE_SIZE:
                # Our encoder keeps an empty table; say so at the next header block (RFC
                # 7541 §4.2).
                self._table_size_update = True
            elif key == ENABLE_PUSH and value > 1:
                raise self._connection_error(PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            elif key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise self._connection_error(FLOW_CONTROL_ERROR,
                                                 "INITIAL_WINDOW_SIZE over 2^31-1")
                initial_window = value  # the last one counts; applied once, below
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
                    raise self._connection_error(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.max_outbound_frame_size = value
        if initial_window is not None and initial_window != self._initial_window:
            delta = initial_window - self._initial_window
            self._initial_window = initial_window
            for stream in self._streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:  # §6.9.2
                    raise self._connection_error(FLOW_CONTROL_ERROR,
                                                 "INITIAL_WINDOW_SIZE takes a window over 2^31-1")
        self._frame(SETTINGS, ACK, 0, b"")
        # Wake every sender waiting for the window (purerpc's reading of any settings).
        events.append(WindowUpdated(0, 0))

    def _on_reset(self, stream_id: int, events: list[Any]) -> None:
        if stream_id > self._last_stream_id:
            raise self._connection_error(PROTOCOL_ERROR, "RST_STREAM on a stream not opened")
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._drop(stream_id, stream, events)

    # ---------------------------------------------------------------------- helpers

    def _open_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise StreamClosedError(stream_id, STREAM_CLOSED)
        return stream

    def _close_remote(self, stream_id: int, stream: _Stream, events: list[Any]) -> None:
        stream.remote_open = False
        self._credit(stream)  # a message the request ended in the middle of
        if not stream.local_open:
            del self._streams[stream_id]
        events.append(RequestEnded(stream_id))

    def _close_local(self, stream_id: int, stream: _Stream) -> None:
        stream.local_open = False
        if stream.remote_open:
            # The response is complete and the request is not (a call answered before its
            # request was read): ask the client to stop sending it (RFC 9113 §8.1), and
            # forget the stream, so a client that never ends its requests cannot fill the
            # stream table.
            self._reset(stream_id, stream, NO_ERROR, [])
        else:
            del self._streams[stream_id]

    def _drop(self, stream_id: int, stream: _Stream, events: list[Any],
              refused: Status | None = None) -> None:
        """Forget a stream that was reset (by either side): its handler gets the end of the
        request if it waits for it (carrying `refused`, the status the connection answered
        the call with, if it did), a sender waiting for the window wakes and finds the
        stream gone, and what it received but never delivered is credited back to the
        connection. Unless the connection answered the call itself (`refused`: its handler
        has nothing to do but end), the transport is told (`StreamReset`)."""
        del self._streams[stream_id]
        self._credit(stream)
        if stream.remote_open:
            ended = RequestEnded(stream_id)
            ended.refused = refused
            events.append(ended)
        events.append(WindowUpdated(stream_id, 0))
        if refused is None:
            events.append(StreamReset(stream_id))

    def _reset(self, stream_id: int, stream: _Stream, code: int, events: list[Any],
               refused: Status | None = None) -> None:
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(code))
        self._drop(stream_id, stream, events, refused)

    def _refuse(self, stream_id: int, stream: _Stream, code: StatusCode, message: str,
                events: list[Any], ended: bool) -> None:
        """Answer a call whose request cannot be read with a status, and stop its request
        unless it has `ended` (then the stream is closed, and nothing more may go on it)."""
        refused = Status(code, message)
        if stream.local_open:
            status = _status_headers(refused)
            if stream.headers_sent:
                block = _encode(status)
            else:
                block = _encode([(":status", "200"), *self._response_headers("+proto"),
                                 *status])
            self._frame(HEADERS, END_HEADERS | END_STREAM, stream_id, self._block(block))
        if ended:
            self._drop(stream_id, stream, events, refused)
        else:
            self._reset(stream_id, stream, NO_ERROR, events, refused)

    def _credit(self, stream: _Stream) -> None:
        if stream.undelivered:
            self.acknowledge_received_data(0, stream.undelivered)
            stream.undelivered = 0

    def _connection_error(self, code: int, message: str) -> Http2ConnectionError:
        if not self._goaway_sent:
            self._goaway_sent = True
            # After `go_away`, the last stream taken: a later GOAWAY may not raise it (§6.8).
            last = self._last_stream_id if self._last_taken is None else self._last_taken
            self._frame(GOAWAY, 0, 0, _GOAWAY.pack(last, code) + message.encode()[:256])
        return Http2ConnectionError(code, message)

    def _encodings(self) -> bool:
        return (self.config._message_encoding is not None
                or self.config._message_accept_encoding is not None)

    def _response_headers(self, content_type_suffix: str) -> list[tuple[str, str]]:
        headers = [("content-type", "application/grpc" + content_type_suffix)]
        if self.config._message_encoding is not None:
            headers.append(("grpc-encoding", self.config._message_encoding))
        if self.config._message_accept_encoding is not None:
            headers.append(("grpc-accept-encoding", self.config._message_accept_encoding))
        return headers

    def _block(self, block: bytes) -> bytes:
        if self._table_size_update:
            self._table_size_update = False
            return _TABLE_SIZE_ZERO + block
        return block

    def _headers(self, stream_id: int, stream: _Stream, block: bytes, end_stream: bool) -> None:
        stream.headers_sent = True
        block = self._block(block)
        flags = END_STREAM if end_stream else 0
        limit = self.max_outbound_frame_size
        if len(block) <= limit:
            self._frame(HEADERS, flags | END_HEADERS, stream_id, block)
        else:
            self._frame(HEADERS, flags, stream_id, block[:limit])
            for at in range(limit, len(block), limit):
                last = at + limit >= len(block)
                self._frame(CONTINUATION, END_HEADERS if last else 0, stream_id,
                            block[at:at + limit])
        if end_stream:
            self._close_local(stream_id, stream)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        self._out += _FRAME_HEADER.pack(len(payload) << 8 | kind, flags, stream_id)
        self._out += payload


def _request(stream_id: int, headers: list[tuple[str, str]]) -> RequestReceived | bytes | None:
    """purerpc's event for a gRPC request's headers; the header block of the HTTP status
    that refuses a request that is not gRPC; None for a malformed one (binary metadata that
    is not base64). The frame reader has checked the pseudo-header fields' presence and
    order. Other `grpc-` fields are the protocol's, not metadata."""
    fields: dict[str, str] = {}
    metadata: list[tuple[str, str | bytes]] = []
    for name, value in headers:
        if name in _REQUEST_FIELDS:
            fields[name] = value
        elif name.startswith("grpc-"):
            continue
        elif name.endswith("-bin"):
            try:
                metadata.extend((name, _b64decode(part)) for part in value.split(","))
            except ValueError:  # binascii.Error, or a character that is not ASCII
                return None
        else:
            metadata.append((name, value))
    if fields[":method"] != "POST":
        return _STATUS_405
    content_type = fields.get("content-type", "")
    if not content_type.startswith("application/grpc"):
        return _STATUS_415
    path = fields[":path"]
    service_name, _, method_name = path[1:].rpartition("/")
    event = RequestReceived(stream_id, fields[":scheme"], service_name, method_name,
                            content_type)
    event.authority = fields.get(":authority")
    event.user_agent = fields.get("user-agent")
    event.message_type = fields.get("grpc-message-type")
    event.message_encoding = fields.get("grpc-encoding")
    if "grpc-accept-encoding" in fields:
        event.message_accept_encoding = fields["grpc-accept-encoding"].split(",")
    if "grpc-timeout" in fields:
        event.timeout = _timeout(fields["grpc-timeout"])
    event.custom_metadata = tuple(metadata)
    return event


def _timeout(value: str) -> timedelta | None:
    """grpc-timeout (up to 8 ASCII digits and a unit) as purerpc reads it; None if it is
    not one."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not (digits.isascii() and digits.isdigit() and len(digits) <= 8):
        return None
    return timedelta(seconds=int(digits) * unit)


def _b64decode(value: str) -> bytes:
    """A -bin header's value: base64, its padding optional (as purerpc reads it)."""
    return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)


def _status_headers(status: Status) -> list[tuple[str, str]]:
    headers = [("grpc-status", str(status.int_value))]
    if status.status_message:
        headers.append(("grpc-message", urllib.parse.quote(status.status_message, safe="")))
    return headers


def _encode(headers: list[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing, not Huffman-coded (RFC 7541 §6.2.2)."""
    out = bytearray()
    for name, value in headers:
        raw_name, raw_value = name.encode(), value.encode()
        out.append(0)
        out += _integer(len(raw_name), 7)
        out += raw_name
        out += _integer(len(raw_value), 7)
        out += raw_value
    return bytes(out)


def _integer(value: int, prefix_bits: int) -> bytes:
    """An HPACK integer with an N-bit prefix, the prefix's other bits zero (RFC 7541 §5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
