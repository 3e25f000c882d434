"""Serving gRPC with purerpc's HTTP/2 machinery but our own request dispatch.

purerpc's own dispatcher turns an unexpected exception into CANCELLED with a repr sent to the
client, cannot send custom trailing metadata with an error, swallows `trio.Cancelled` in bare
excepts, and binds every interface. Here handlers take the raw request bytes (so the append path
can hand them to the Rust extension unparsed) and return serialized replies; every failure
becomes a status through `eventstore.grpc.status`.
"""

from __future__ import annotations

import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import h2.connection
import h2.exceptions
import h2.stream
import trio
from anyio.streams.tls import TLSAttribute
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import SocketWrapper
from purerpc.grpclib.connection import GRPCConfiguration, GRPCConnection
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import StreamClosedError
from purerpc.grpclib.status import Status, StatusCode

from eventstore.auth.principals import ANONYMOUS, Principal
from eventstore.auth.tls import QuietTLSListener
from eventstore.errors import EventStoreError, LimitExceeded
from eventstore.grpc.status import internal_error, to_status

log = logging.getLogger(__name__)

# Who is calling: from the call's custom metadata and the TLS client certificate (or None);
# raises Unauthenticated.
Authenticate = Callable[[tuple[tuple[str, Any], ...], Any], Principal]
UnaryHandler = Callable[[bytes, RequestReceived], Awaitable[bytes]]
StreamHandler = Callable[[bytes, RequestReceived], AsyncIterator[bytes]]

# What sending on a stream raises once its client has gone (RST_STREAM, closed socket).
CLIENT_GONE = (
    h2.exceptions.StreamClosedError,
    StreamClosedError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
)

# purerpc tears a whole connection down for a message over its limit; keep ours below it.
TRANSPORT_MAX_MESSAGE = 32 * 1024 * 1024


class _EagerSocket(SocketWrapper):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's socket wrapper, plus `send_now`: a streaming handler's task writes its own
    message to the socket at once.

    purerpc leaves every write to one writer task per connection, woken by an event. When the
    live feed wakes many subscriptions at once, Trio runs all of them before any writer task,
    so the first subscriber's bytes left only after every subscriber's message was built (and
    the median subscriber waited for half the others twice). Both paths take and send the
    connection's pending bytes under one lock, so they leave in the order they were framed.
    """

    _flush_event: anyio.Event  # purerpc's, set by every flush

    def __init__(self, grpc_connection: Any, stream: Any) -> None:
        super().__init__(grpc_connection, stream)
        self._send_lock = trio.Lock()
        # The plain TCP socket (None under TLS, whose bytes must go through the TLS stream).
        self._raw = (stream.extra(anyio.abc.SocketAttribute.raw_socket)
                     if isinstance(stream, anyio.abc.SocketStream) else None)

    async def _writer_thread(self) -> None:
        while True:
            async with self._send_lock:
                data = self._grpc_connection.data_to_send()
                if data:
                    await self._stream.send(data)
                    continue
            if not self._running:
                return
            await self._flush_event.wait()
            self._flush_event = anyio.Event()

    async def send_now(self) -> bool:
        """Send what is pending unless a send is in progress (then its sender takes this too:
        purerpc's flush has already woken the writer task). True if this task sent (and so
        yielded to Trio).

        The bytes go to the socket without yielding while the lock is held: Trio's socket send
        yields after its system call, and a lock held across that yield sent every other
        subscription of the connection woken in the same round to the writer task, after
        the whole round — the first subscriber on each connection got its event at once,
        the rest only once all of them had been framed."""
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            return False
        try:
            data = self._grpc_connection.data_to_send()
            if not data:
                return False
            sent = self._send_at_once(data)
            if sent < len(data):
                # The socket's buffer is full (a slow reader): the rest goes the waiting
                # way, still under the lock, so bytes keep their order.
                await self._stream.send(data[sent:])
                return True
        finally:
            self._send_lock.release()
        await trio.lowlevel.checkpoint()
        return True

    def _send_at_once(self, data: bytes) -> int:
        """As much of `data` as the socket takes now, without waiting (0 under TLS)."""
        if self._raw is None:
            return 0
        try:
            return int(self._raw.send(data))
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise anyio.BrokenResourceError from exc


# An HTTP/2 frame header: 24-bit length and 8-bit type (as one int), flags, stream id.
_FRAME_HEADER = struct.Struct(">IBI")
_DATA_FRAME = 0x0


# A response's usual header blocks, HPACK-encoded once: ":status: 200" (static table entry 8),
# "content-type: application/grpc+proto", and the trailers "grpc-status: 0" — literals "without
# indexing", which leave both sides' dynamic tables untouched, so the same bytes are valid in
# any state of the connection.
_HEADERS_FRAME = 0x1
_END_STREAM = 0x1
_END_HEADERS = 0x4
_OK_HEADERS = b"\x88\x0f\x10\x16application/grpc+proto"
_OK_TRAILERS = b"\x00\x0bgrpc-status\x010"


class _Connection(GRPCConnection):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's connection, with faster frames for what every call sends: a DATA frame per
    message, and the usual response headers and OK trailers.

    h2 builds a hyperframe object per DATA frame and logs four debug lines; with 64 live
    subscribers that was 14% of the server's Python time. This does what h2 3.x's
    `send_data` does for an unpadded frame without END_STREAM — the same checks, the same
    connection and stream state transitions (a closed stream still raises), the same window
    accounting — and writes the frame's bytes itself (tests/test_units.py compares the two
    byte for byte). Anything else goes to h2.
    """

    def start_response(self, stream_id: int, content_type_suffix: str = "",
                       custom_metadata: Any = ()) -> None:
        if content_type_suffix != "+proto" or custom_metadata or not self._plain_headers():
            return super().start_response(stream_id, content_type_suffix,  # type: ignore[no-any-return]
                                          custom_metadata)
        self._send_header_block(stream_id, _OK_HEADERS, end_stream=False)
        return None

    def end_response(self, stream_id: int, status: Status, custom_metadata: Any = ()) -> None:
        if (status.int_value != 0 or status.status_message or custom_metadata
                or not self._plain_headers()):
            return super().end_response(stream_id, status,  # type: ignore[no-any-return]
                                        custom_metadata)
        self._send_header_block(stream_id, _OK_TRAILERS, end_stream=True)
        return None

    def _plain_headers(self) -> bool:
        """Whether the ready-made header blocks fit: no message encoding configured, and no
        HPACK table size update pending (it must open the next header block, so h2's
        encoder has to write that one)."""
        return (self.config._message_encoding is None
                and self.config._message_accept_encoding is None
                and not self.h2_connection.encoder.table_size_changes)

    def _send_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        """What h2's `send_headers` does for a response's headers or trailers on an open
        stream — the same connection and stream state transitions (a closed stream still
        raises) — with a ready-made header block in one HEADERS frame."""
        connection = self.h2_connection
        connection.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        stream = connection._get_stream_by_id(stream_id)
        stream.state_machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
        flags = _END_HEADERS
        if end_stream:
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
            flags |= _END_STREAM
        connection._data_to_send += _FRAME_HEADER.pack(len(block) << 8 | _HEADERS_FRAME, flags,
                                                       stream_id)
        connection._data_to_send += block

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        connection = self.h2_connection
        size = len(data)
        if end_stream or size > connection.max_outbound_frame_size:
            return super().send_data(stream_id, data, end_stream=end_stream)  # type: ignore[no-any-return]
        stream = connection._get_stream_by_id(stream_id)
        if size > connection.outbound_flow_control_window or (
                size > stream.outbound_flow_control_window):
            return super().send_data(stream_id, data)  # type: ignore[no-any-return]
        connection.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
        stream.state_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
        stream.outbound_flow_control_window -= size
        connection.outbound_flow_control_window -= size
        connection._data_to_send += _FRAME_HEADER.pack(size << 8 | _DATA_FRAME, 0, stream_id)
        connection._data_to_send += data
        return None


# A gRPC message's prefix: compressed flag, then length.
_MESSAGE_PREFIX = struct.Struct(">?I")


class _EagerStream(GRPCProtoStream):  # type: ignore[misc]  # purerpc is untyped
    # purerpc's: the request's headers and its end, and whether the response has started.
    _start_stream_event: Any
    _end_stream_event: Any
    _response_started: bool

    async def _receive(self) -> Any:
        """purerpc's, without a yield to Trio when the event is already queued: a unary
        call's headers, message and end usually arrive in one read, and each yield costs a
        round of the scheduler before the handler starts."""
        incoming = self._incoming_events[1]
        try:
            event = incoming.receive_nowait()
        except anyio.WouldBlock:
            event = await incoming.receive()
        if isinstance(event, MessageReceived):
            self._grpc_connection.acknowledge_received_data(self._stream_id,
                                                            event.flow_controlled_length)
            await self._socket.flush()
        elif isinstance(event, RequestEnded | ResponseEnded):
            assert self._end_stream_event is None
            self._end_stream_event = event
        else:
            assert self._start_stream_event is None
            self._start_stream_event = event
        return event

    async def close(self, status: Status | None = None, content_type_suffix: str = "",
                    custom_metadata: Any = ()) -> None:
        """purerpc's, with the response's headers framed first when they have not been sent
        (a unary call's are sent with its reply): an error then still ends with trailers of
        its own, not a trailers-only response, whose metadata purerpc's clients do not read
        as trailing metadata."""
        if not self._response_started:
            self._grpc_connection.start_response(self._stream_id, "+proto")
            self._response_started = True
        await super().close(status, content_type_suffix, custom_metadata)

    async def send_unary(self, data: bytes) -> None:
        """Answer a unary call: its headers, its message and the OK trailers, framed together
        and written to the socket by this task (purerpc sent the headers on their own when the
        call started, and each of its sends woke the connection's writer task)."""
        connection = self._grpc_connection
        connection.start_response(self._stream_id, "+proto")
        self._response_started = True
        message = _MESSAGE_PREFIX.pack(False, len(data)) + data
        if len(message) <= connection.flow_control_window(self._stream_id):
            connection.send_data(self._stream_id, message)
        else:
            await self._send(data)
        self._close_local()
        connection.end_response(self._stream_id, Status(StatusCode.OK))
        if not await self._socket.send_now():
            await self._socket.flush()

    async def send_eagerly(self, data: bytes) -> None:
        """Send one serialized streaming reply and yield to Trio once (the streaming loops
        must; purerpc's send path does not while the HTTP/2 window is open).

        A reply that fits the open window goes out as one DATA frame written to the socket by
        this task (`_EagerSocket.send_now`), without purerpc's message buffer and without
        waking the connection's writer task; a larger one takes purerpc's path, which splits
        it and waits for the client to open the window."""
        connection = self._grpc_connection
        message = _MESSAGE_PREFIX.pack(False, len(data)) + data
        if len(message) <= connection.flow_control_window(self._stream_id):
            connection.send_data(self._stream_id, message)
        else:
            await self._send(data)
        if not await self._socket.send_now():
            await self._socket.flush()
            await trio.lowlevel.checkpoint()


class _Socket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    StreamClass = _EagerStream

    def __init__(self, config: GRPCConfiguration, stream: Any) -> None:
        super().__init__(config, stream)
        self._grpc_connection = _Connection(config)
        self._socket = _EagerSocket(self._grpc_connection, stream)

    async def _listen(self) -> AsyncIterator[_EagerStream]:
        """purerpc's, handing each event to its stream without a yield to Trio (the streams'
        queues are unbounded): one read of the socket, one yield."""
        streams = self._streams
        while True:
            try:
                data = await self._socket.recv(self._receive_buffer_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            events = self._grpc_connection.receive_data(data)
            await self._socket.flush()
            for event in events:
                if isinstance(event, WindowUpdated):
                    if event.stream_id == 0:
                        for stream in streams.values():
                            await stream._set_flow_control_update()
                    elif event.stream_id in streams:
                        await streams[event.stream_id]._set_flow_control_update()
                    continue
                if isinstance(event, RequestReceived):
                    self._allocate_stream(event.stream_id)
                streams[event.stream_id]._incoming_events[0].send_nowait(event)
                if isinstance(event, RequestReceived):
                    yield streams[event.stream_id]
                elif isinstance(event, RequestEnded | ResponseEnded):
                    streams[event.stream_id]._close_remote()


@dataclass(frozen=True)
class Method:
    unary: UnaryHandler | None = None
    stream: StreamHandler | None = None
    # Callable without credentials (the health service: load balancers probe it).
    public: bool = False


class GrpcServer:
    """Serves `methods` (keyed by "package.Service/Method") on one TCP port."""

    def __init__(self, methods: dict[str, Method], *, max_request_bytes: int,
                 observe: Callable[[str, str, float], None] | None = None,
                 authenticate: Authenticate | None = None,
                 refused: Callable[[str, str, str], None] | None = None) -> None:
        self._methods = methods
        self._authenticate = authenticate
        # Told (method, peer, reason) of every call refused as unauthenticated (the audit log).
        self._refused = refused
        self._observe = observe
        self._max_request_bytes = max_request_bytes
        self._config = GRPCConfiguration(client_side=False,
                                         max_message_length=TRANSPORT_MAX_MESSAGE)
        self.port: int | None = None

    async def serve(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on host:port (host "" or "*": every interface); report the bound port."""
        listener: anyio.abc.Listener[anyio.abc.ByteStream]
        tcp = await anyio.create_tcp_listener(
            local_host=None if host in ("", "*") else host, local_port=port
        )
        self.port = int(tcp.extra(anyio.abc.SocketAttribute.local_port))
        listener = tcp
        if ssl_context is not None:
            listener = QuietTLSListener(tcp, ssl_context, standard_compatible=False)
        async with listener:
            task_status.started(self.port)
            await listener.serve(self._connection)

    async def _connection(self, byte_stream: anyio.abc.ByteStream) -> None:
        peer = _peer_of(byte_stream)
        certificate = byte_stream.extra(TLSAttribute.peer_certificate, None)
        try:
            async with _Socket(self._config, byte_stream) as grpc_socket:
                async with trio.open_nursery() as nursery:
                    async for stream in grpc_socket.listen():
                        nursery.start_soon(self._request, stream, peer, certificate)
        except Exception as exc:
            # A peer that resets or speaks bad HTTP/2 only ends its own connection.
            log.debug("gRPC connection ended: %s", type(exc).__name__)
        finally:
            # purerpc does not close the socket; without this the peer sees no EOF and the
            # descriptor lives until garbage collection.
            with trio.CancelScope(shield=True):
                await byte_stream.aclose()

    async def _request(self, stream: _EagerStream, peer: str,
                       certificate: Any) -> None:
        try:
            event = await stream.receive_event()
            # Handlers see where the call came from (the audit log names it).
            event.peer = peer
            event.principal = ANONYMOUS
            if not isinstance(event, RequestReceived):
                await stream.close(Status(StatusCode.INTERNAL, status_message="expected headers"))
                return
            method = self._methods.get(f"{event.service_name}/{event.method_name}")
            if method is None:
                await stream.close(Status(
                    StatusCode.UNIMPLEMENTED,
                    status_message=f"method {event.service_name}/{event.method_name} "
                    "is not implemented",
                ))
                return
            await self._dispatch(stream, event, method, certificate)
        except Exception as exc:
            log.debug("gRPC stream ended: %s", type(exc).__name__)

    async def _dispatch(self, stream: _EagerStream, event: RequestReceived,
                        method: Method, certificate: Any) -> None:
        started = time.perf_counter()
        code = "OK"
        try:
            if self._authenticate is not None and not method.public:
                # Before the request is read: an unknown caller learns nothing about it.
                try:
                    event.principal = self._authenticate(event.custom_metadata, certificate)
                except EventStoreError as refusal:
                    if self._refused is not None:
                        self._refused(event.method_name, str(getattr(event, "peer", "")),
                                      refusal.message)
                    raise
            raw = await stream.receive_message()
            if raw is None:
                raise _BadRequest("the request has no message")
            if await stream.receive_message() is not None:
                raise _BadRequest("expected exactly one request message")
            if len(raw) > self._max_request_bytes:
                raise LimitExceeded(
                    f"request: {len(raw)} bytes, over the limit of {self._max_request_bytes}"
                )
            if method.unary is not None:
                reply = await method.unary(bytes(raw), event)
                await stream.send_unary(reply)
                return
            assert method.stream is not None
            # A stream's headers go at once: its first message may be long in coming.
            await stream.start_response()
            replies = method.stream(bytes(raw), event)
            try:
                async for reply in replies:
                    await stream.send_eagerly(reply)
            finally:
                aclose = getattr(replies, "aclose", None)
                if aclose is not None:
                    await aclose()
            await stream.close(Status(StatusCode.OK))
        except CLIENT_GONE:
            # The client cancelled or disconnected: nobody is left to answer.
            code = "CANCELLED"
            log.debug("client went away during %s/%s", event.service_name, event.method_name)
        except EventStoreError as error:
            status, trailers = to_status(error)
            code = status.status_code.name
            await stream.close(status, custom_metadata=trailers)
        except _BadRequest as bad:
            code = "INVALID_ARGUMENT"
            await stream.close(Status(StatusCode.INVALID_ARGUMENT, status_message=str(bad)))
        except Exception:
            code = "INTERNAL"
            log.exception("unexpected error in %s/%s", event.service_name, event.method_name)
            await stream.close(internal_error())
        finally:
            if self._observe is not None:
                self._observe(event.method_name, code, time.perf_counter() - started)


def _peer_of(byte_stream: anyio.abc.ByteStream) -> str:
    """"host:port" of the client, for the audit log."""
    try:
        address = byte_stream.extra(anyio.abc.SocketAttribute.remote_address)
    except Exception:
        return "unknown"
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class _BadRequest(Exception):
    """The HTTP/2 request did not carry exactly one gRPC message."""
