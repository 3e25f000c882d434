"""Serving gRPC with purerpc's sockets, streams and events, over our own HTTP/2 connection
(`eventstore.grpc.http2`, with frames and HPACK in the Rust extension), and our own request
dispatch.

purerpc's own dispatcher turns an unexpected exception into CANCELLED with a repr sent to the
client, cannot send custom trailing metadata with an error, swallows `trio.Cancelled` in bare
excepts, and binds every interface. Here handlers take the raw request bytes (so the append path
can hand them to the Rust extension unparsed) and return serialized replies; every failure
becomes a status through `eventstore.grpc.status`.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import trio
from anyio.streams.tls import TLSAttribute
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState, SocketWrapper
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import StreamClosedError
from purerpc.grpclib.status import Status, StatusCode

from eventstore.auth.principals import ANONYMOUS, Principal
from eventstore.auth.tls import QuietTLSListener
from eventstore.errors import EventStoreError, LimitExceeded
from eventstore.grpc.http2 import (
    CANCEL,
    REFUSED_STREAM,
    Http2ConnectionError,
    ServerConnection,
    StreamReset,
)
from eventstore.grpc.status import internal_error, to_status

log = logging.getLogger(__name__)

# Who is calling: from the call's custom metadata and the TLS client certificate (or None);
# raises Unauthenticated.
Authenticate = Callable[[tuple[tuple[str, Any], ...], Any], Principal]
UnaryHandler = Callable[[bytes, RequestReceived], Awaitable[bytes]]
StreamHandler = Callable[[bytes, RequestReceived], AsyncIterator[bytes]]


def after_reply(request: RequestReceived, action: Callable[[], None]) -> None:
    """Run `action` once the call's reply has been handed to the socket, or the call has
    ended without one (the client went away, the server stops): work the client need not wait
    for, such as the audit line of a write that succeeded. Outside a call the transport runs,
    `action` runs at once."""
    pending: list[Callable[[], None]] | None = getattr(request, "after_reply", None)
    if pending is None:
        action()
    else:
        pending.append(action)


# What sending on a stream raises once its client has gone (RST_STREAM, closed socket).
CLIENT_GONE = (
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
        # Bytes being written by a waiting send, and the senders waiting for it to end
        # (`wait_backlog`).
        self._in_flight = 0
        self._sent: trio.Event | None = None
        self._writer_gone = False

    async def _writer_thread(self) -> None:
        """purerpc's writer task, sending under the lock. Only this task and `drain` (the
        connection's own task) wait for the socket: a call's handler can be cancelled (its
        client reset the call), and a write cut short would leave every other stream of the
        connection a partial frame."""
        try:
            while True:
                async with self._send_lock:
                    data = self._grpc_connection.data_to_send()
                    if data:
                        await self._send_waiting(data)
                        continue
                if not self._running:
                    return
                await self._flush_event.wait()
                self._flush_event = anyio.Event()
        finally:
            self._writer_gone = True
            self._wake_senders()

    async def drain(self) -> None:
        """Send everything pending, waiting for the socket as long as it takes."""
        async with self._send_lock:
            while data := self._grpc_connection.data_to_send():
                await self._send_waiting(data)

    async def _send_waiting(self, data: bytes) -> None:
        self._in_flight = len(data)
        try:
            await self._stream.send(data)
        finally:
            self._in_flight = 0
            self._wake_senders()

    def _wake_senders(self) -> None:
        if self._sent is not None:
            self._sent.set()
            self._sent = None

    def backlogged(self) -> bool:
        """Whether the connection owes its client more than `_MAX_UNSENT` bytes (a client
        that reads slower than its calls' replies are made)."""
        owed: int = self._in_flight + self._grpc_connection.bytes_to_send()
        return owed > _MAX_UNSENT

    async def wait_backlog(self) -> None:
        """Wait until the connection owes its client at most `_MAX_UNSENT` bytes: a handler
        making replies (a subscription, a large read) waits for its client to read them, so
        the server never holds more than that for a slow client's connection — its HTTP/2
        windows, which the client chooses, would let it hold up to 2 GiB a stream."""
        while self.backlogged() and not self._writer_gone:
            await self.flush()  # the writer task sends what is framed
            if self._sent is None:
                self._sent = trio.Event()
            await self._sent.wait()

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
            if sent:
                self._wake_senders()  # the backlog shrank: waiters look again
            if sent < len(data):
                # The socket takes no more now (a slow reader; or TLS, whose bytes this task
                # does not write itself): the writer task sends the rest, first, so bytes keep
                # their order. Not this task: see `_writer_thread`.
                self._grpc_connection.unsend(data[sent:])
                self._flush_event.set()
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


# purerpc's read size.
_RECEIVE_BUFFER = 1024 * 1024
# Bytes the connection may owe its client before the server stops reading from it.
_MAX_UNSENT = 1024 * 1024
# How long the GOAWAY of a protocol error may take to leave before the connection closes.
_GOAWAY_SECONDS = 5.0
# How many handlers may still run on one connection for calls that were reset (by the client,
# or by the server for the client's error on the stream), before new calls on it are refused
# (RST_STREAM REFUSED_STREAM, which a client may retry). A reset frees its stream at once, so
# without this bound a client sending HEADERS and RST_STREAM in a loop ("rapid reset",
# CVE-2023-44487), or frames that get its streams reset, has the server run any number of
# calls at once.
MAX_RESET_RUNNING = 1_024
# How long a call's request may take to arrive in full (the server's setting
# REQUEST_READ_SECONDS).
REQUEST_SECONDS = 60.0

# A gRPC message's prefix: compressed flag, then length.
_MESSAGE_PREFIX = struct.Struct(">?I")


class _EagerStream(GRPCProtoStream):  # type: ignore[misc]  # purerpc is untyped
    # purerpc's: the request's headers and its end, and whether the response has started.
    _start_stream_event: Any
    _end_stream_event: Any
    _response_started: bool

    def __init__(self, grpc_connection: Any, stream_id: int, socket: Any,
                 grpc_socket: Any) -> None:
        """purerpc's, with a plain queue for the incoming events instead of an anyio memory
        stream pair (whose creation and finalizers were 3% of the server's samples at
        batch 1 × 64 clients)."""
        self._stream_id = stream_id
        self._grpc_connection = grpc_connection
        self._grpc_socket = grpc_socket
        self._socket = socket
        self._window_waiter: trio.Event | None = None
        # Reset while its handler runs (by the client, or for the client's error on it), and
        # counted in `_Socket._reset_running` until the handler ends.
        self.was_reset = False
        # A streaming handler's scope, cancelled when the call is reset.
        self.cancel_on_reset: trio.CancelScope | None = None
        self._incoming: deque[Any] = deque()
        self._arrival: trio.Event | None = None
        self._response_started = False
        # Whether the response has ended (its status framed): a call's deadline passing
        # after that changes nothing. Whether a message is framed only in part (it waits for
        # the client's window): a status after it would follow half a message.
        self.answered = False
        self.partly_sent = False
        self._state = GRPCStreamState.OPEN
        self._start_stream_event = None
        self._end_stream_event = None

    async def _wait_flow_control_update(self) -> None:
        """Wait for the client to open the window (purerpc's `_send` checks the window
        again after this returns)."""
        self._window_waiter = waiter = trio.Event()
        try:
            await waiter.wait()
        finally:
            self._window_waiter = None

    def window_opened(self) -> None:
        """The client opened this stream's or the connection's window, or reset the stream:
        wake a sender waiting for it. Nothing to do for a stream not waiting, the usual case
        (purerpc set an event on every stream for every WINDOW_UPDATE: 3% of the server's
        samples at batch 1 × 64 clients)."""
        if self._window_waiter is not None:
            self._window_waiter.set()

    def reset(self, code: int) -> None:
        """End the stream with RST_STREAM `code`, sent by the writer task."""
        self._grpc_connection.reset_stream(self._stream_id, code)
        self._socket._flush_event.set()

    def request_complete(self) -> bool:
        """Whether the request's end has arrived (then reading it cannot wait). The end is
        the last event a stream is given."""
        incoming = self._incoming
        return self._end_stream_event is not None or (
            bool(incoming) and isinstance(incoming[-1], RequestEnded))

    def unread(self) -> list[Any]:
        """Take the events nobody read."""
        events = list(self._incoming)
        self._incoming.clear()
        return events

    def deliver(self, event: Any) -> None:
        """Queue an event from the connection (never blocks)."""
        self._incoming.append(event)
        if self._arrival is not None:
            self._arrival.set()

    async def _receive(self) -> Any:
        """purerpc's, without a yield to Trio when the event is already queued (a unary
        call's headers, message and end usually arrive in one read, and each yield costs a
        round of the scheduler before the handler starts), and without waking the writer task
        when acknowledging the message left nothing to send."""
        while not self._incoming:
            self._arrival = trio.Event()
            await self._arrival.wait()
        self._arrival = None
        event = self._incoming.popleft()
        if isinstance(event, MessageReceived):
            connection = self._grpc_connection
            connection.acknowledge_received_data(self._stream_id, event.flow_controlled_length)
            if connection.has_data_to_send():  # a WINDOW_UPDATE, once half a window is used
                await self._socket.flush()
        elif isinstance(event, RequestEnded):
            assert self._end_stream_event is None
            self._end_stream_event = event
        else:
            assert self._start_stream_event is None
            self._start_stream_event = event
        return event

    async def receive_event(self) -> Any:
        """The next event, through this class's `_receive`: purerpc's
        `GRPCProtoStream.receive_event` calls its base class's `_receive` by `super()` (to
        parse messages into a type we do not set), which bypassed this class's."""
        return await self._receive()

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
        self.answered = True

    async def send_unary(self, data: bytes) -> None:
        """Answer a unary call: its headers, its message and the OK trailers, framed together
        and written to the socket by this task (purerpc sent the headers on their own when the
        call started, and each of its sends woke the connection's writer task)."""
        if self._socket.backlogged():
            await self._socket.wait_backlog()
        connection = self._grpc_connection
        connection.start_response(self._stream_id, "+proto")
        self._response_started = True
        message = _MESSAGE_PREFIX.pack(False, len(data)) + data
        if len(message) <= connection.flow_control_window(self._stream_id):
            connection.send_data(self._stream_id, message)
        else:
            await self._send_windowed(message)
        self._close_local()
        connection.end_response(self._stream_id, Status(StatusCode.OK))
        self.answered = True
        if not await self._socket.send_now():
            await self._socket.flush()

    async def send_eagerly(self, data: bytes) -> None:
        """Send one serialized streaming reply and yield to Trio once (the streaming loops
        must; purerpc's send path does not while the HTTP/2 window is open).

        A reply that fits the open window goes out as one DATA frame written to the socket by
        this task (`_EagerSocket.send_now`), without purerpc's message buffer and without
        waking the connection's writer task; a larger one is split as the window allows
        (`_send_windowed`). While the connection owes its client more than `_MAX_UNSENT`
        bytes, it first waits for the client to read (`_EagerSocket.wait_backlog`)."""
        if self._socket.backlogged():
            await self._socket.wait_backlog()
        connection = self._grpc_connection
        message = _MESSAGE_PREFIX.pack(False, len(data)) + data
        if len(message) <= connection.flow_control_window(self._stream_id):
            connection.send_data(self._stream_id, message)
        else:
            await self._send_windowed(message)
        if not await self._socket.send_now():
            await self._socket.flush()
            await trio.lowlevel.checkpoint()

    async def _send_windowed(self, message: bytes) -> None:
        """Send a framed message (prefix and body) larger than the open window: DATA frames
        cut from it without copying, as much as the window takes, handed to the socket before
        waiting for the client to open the window again. purerpc's `_send` copied the rest of
        the message for every 16 KiB frame, quadratic in its size: most of the time of a
        3.5 MB ReadAll page."""
        connection = self._grpc_connection
        view = memoryview(message)
        sent = 0
        while sent < len(view):
            window = connection.flow_control_window(self._stream_id)
            if window <= 0:
                await self._socket.flush()
                await self._wait_flow_control_update()
                continue
            chunk = view[sent:sent + window]
            connection.send_data(self._stream_id, chunk)
            sent += len(chunk)
            self.partly_sent = True
        self.partly_sent = False


class _Socket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's server socket over our HTTP/2 connection (`eventstore.grpc.http2`)."""

    StreamClass = _EagerStream

    def __init__(self, config: GRPCConfiguration, stream: Any,
                 max_reset_running: int = MAX_RESET_RUNNING) -> None:
        # Not purerpc's __init__: it would build an h2 connection only to drop it.
        contextlib.AsyncExitStack.__init__(self)
        self._grpc_connection = ServerConnection(config)
        self._socket = _EagerSocket(self._grpc_connection, stream)
        self._receive_buffer_size = _RECEIVE_BUFFER
        self._streams: dict[int, _EagerStream] = {}
        # Handlers still running for calls the client has reset (see MAX_RESET_RUNNING).
        self._reset_running = 0
        self._max_reset_running = max_reset_running

    async def _listen(self) -> AsyncIterator[_EagerStream]:
        """purerpc's, handing each event to its stream without a yield to Trio (the streams'
        queues are unbounded): one read of the socket, one yield. The writer task is woken
        only when the connection has something of its own to send (a SETTINGS or PING
        acknowledgement, a WINDOW_UPDATE, a reset); a protocol error's GOAWAY is sent before
        the connection ends."""
        streams = self._streams
        connection = self._grpc_connection
        while True:
            try:
                data = await self._socket.recv(self._receive_buffer_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            try:
                events = connection.receive_data(data)
            except Http2ConnectionError as error:
                log.debug("gRPC connection ended by a protocol error: %s", error)
                with trio.move_on_after(_GOAWAY_SECONDS):  # a client that reads nothing
                    await self._socket.drain()
                return
            if connection.has_data_to_send():
                if connection.bytes_to_send() > _MAX_UNSENT:
                    # A client that sends but does not read (pings, refused calls): stop
                    # reading it until what it is owed has left.
                    await self._socket.drain()
                else:
                    await self._socket.flush()
            refused = False
            for event in events:
                if isinstance(event, WindowUpdated):
                    if event.stream_id == 0:
                        for stream in streams.values():
                            stream.window_opened()
                    elif event.stream_id in streams:
                        streams[event.stream_id].window_opened()
                    continue
                if isinstance(event, StreamReset):
                    reset = streams.get(event.stream_id)
                    if reset is not None and not reset.was_reset:
                        reset.was_reset = True
                        self._reset_running += 1
                        if reset.cancel_on_reset is not None:
                            reset.cancel_on_reset.cancel()
                    continue
                if isinstance(event, RequestReceived):
                    if self._reset_running >= self._max_reset_running:
                        # RFC 9113 §8.7: nothing was done for it; the client may retry it.
                        connection.reset_stream(event.stream_id, REFUSED_STREAM)
                        refused = True
                        continue
                    stream = self._allocate_stream(event.stream_id)
                    stream.deliver(event)
                    yield stream
                    continue
                known = streams.get(event.stream_id)
                if known is None:
                    self._discard(event)  # its handler has finished
                    continue
                known.deliver(event)
                if isinstance(event, RequestEnded):
                    known._close_remote()
            if refused:
                await self._socket.flush()

    def go_away(self) -> None:
        """GOAWAY to the client, sent by the writer task (see `GrpcServer.go_away`)."""
        self._grpc_connection.go_away()
        self._socket._flush_event.set()

    def forget(self, stream: _EagerStream) -> None:
        """A finished handler's stream: purerpc keeps it until both sides have closed, which
        a stream reset by the client never does. Messages it never read (a call answered
        before its request was read) free their share of the connection's window."""
        self._streams.pop(stream._stream_id, None)
        # Whether or not the stream was still in the table (purerpc's close drops a stream
        # whose both sides have ended), a reset call counted is uncounted once.
        if stream.was_reset:
            stream.was_reset = False
            self._reset_running -= 1
        for event in stream.unread():
            self._discard(event)

    def _discard(self, event: Any) -> None:
        """An event for a handler that has finished (a call answered before its request was
        read, whose client may still be sending): a message still counts against the
        connection's window until it is acknowledged."""
        if isinstance(event, MessageReceived):
            self._grpc_connection.acknowledge_received_data(event.stream_id,
                                                            event.flow_controlled_length)


@dataclass(frozen=True)
class Method:
    unary: UnaryHandler | None = None
    stream: StreamHandler | None = None
    # Callable without credentials (the health service: load balancers probe it).
    public: bool = False
    # Told (request, outcome, reason, seconds) of a call the transport answered before its
    # handler could run (a request over the size limit, one that cannot be decompressed or
    # did not arrive in time): a write's audit line. `outcome` is the domain error's name.
    refused: Callable[[RequestReceived, str, str, float], None] | None = None


# The outcome (domain error name) of a call refused by the transport, by its status.
_REFUSAL_OUTCOMES = {
    StatusCode.RESOURCE_EXHAUSTED: "LimitExceeded",
    StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    StatusCode.UNIMPLEMENTED: "Unimplemented",
    StatusCode.INTERNAL: "Internal",
}


class GrpcServer:
    """Serves `methods` (keyed by "package.Service/Method") on one TCP port."""

    def __init__(self, methods: dict[str, Method], *, max_request_bytes: int,
                 observe: Callable[[str, str, float], None] | None = None,
                 authenticate: Authenticate | None = None,
                 refused: Callable[[str, str, str], None] | None = None,
                 max_reset_running: int = MAX_RESET_RUNNING,
                 request_seconds: float = REQUEST_SECONDS) -> None:
        self._methods = methods
        self._request_seconds = request_seconds
        # The connections open, to be told when the server stops (`go_away`).
        self._sockets: set[_Socket] = set()
        self._going_away = False
        self._max_reset_running = max_reset_running
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
        socket: _Socket | None = None
        try:
            async with _Socket(self._config, byte_stream,
                               self._max_reset_running) as grpc_socket:
                socket = grpc_socket
                self._sockets.add(socket)
                if self._going_away:
                    socket.go_away()
                async with trio.open_nursery() as nursery:
                    async for stream in grpc_socket.listen():
                        nursery.start_soon(self._request, grpc_socket, stream, peer,
                                           certificate)
                    # The client has gone (EOF), or broke the protocol and was sent GOAWAY:
                    # nobody is left to answer, and a handler waiting for its request or for
                    # the window would wait forever. (An append already queued is still
                    # committed by the writer.)
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            # A peer that resets or speaks bad HTTP/2 only ends its own connection.
            log.debug("gRPC connection ended: %s", type(exc).__name__)
        finally:
            if socket is not None:
                self._sockets.discard(socket)
            # purerpc does not close the socket; without this the peer sees no EOF and the
            # descriptor lives until garbage collection.
            with trio.CancelScope(shield=True):
                await byte_stream.aclose()

    def go_away(self) -> None:
        """The server is stopping: every connection gets GOAWAY (NO_ERROR) with the last call
        it has taken, and later calls on it are refused (REFUSED_STREAM, which a client may
        retry elsewhere); a connection opened from now on gets GOAWAY at once. The calls
        taken go on to their end."""
        self._going_away = True
        for socket in list(self._sockets):
            socket.go_away()

    async def _request(self, grpc_socket: _Socket, stream: _EagerStream, peer: str,
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
        finally:
            grpc_socket.forget(stream)

    async def _dispatch(self, stream: _EagerStream, event: RequestReceived,
                        method: Method, certificate: Any) -> None:
        """Run a call; count it (`observe`) and run what it left for after its reply.

        A unary call runs to its end, even if its client resets it or its deadline passes: an
        append is committed all the same and audited, and a read's work is done in a worker
        thread that cannot be interrupted. A streaming call (a subscription) ends as soon as its
        client resets it (not at its next send, which may be a checkpoint interval away), or at
        its deadline (grpc-timeout) with DEADLINE_EXCEEDED. (A cancel scope per unary call,
        for a deadline that it would rarely change anything for, costs some 10 µs a call.)"""
        started = time.perf_counter()
        code = "OK"
        deferred: list[Callable[[], None]] = []
        event.after_reply = deferred
        try:
            if method.stream is None:
                code = await self._handle(stream, event, method, certificate, started)
            else:
                with trio.CancelScope() as scope:
                    stream.cancel_on_reset = scope
                    if stream.was_reset:
                        scope.cancel()
                    timeout = getattr(event, "timeout", None)
                    if timeout is not None:
                        scope.deadline = trio.current_time() + timeout.total_seconds()
                    code = await self._handle(stream, event, method, certificate, started)
                if scope.cancelled_caught:
                    code = "CANCELLED"
                    if not stream.was_reset and not stream.answered:  # the deadline passed
                        code = "DEADLINE_EXCEEDED"
                        with contextlib.suppress(*CLIENT_GONE):
                            if stream.partly_sent:  # no status after half a message
                                stream.reset(CANCEL)
                            else:
                                await stream.close(Status(
                                    StatusCode.DEADLINE_EXCEEDED,
                                    status_message="the deadline passed"))
        except trio.Cancelled:
            code = "CANCELLED"  # the client's connection ended (or the server stops)
            raise
        finally:
            if self._observe is not None:
                self._observe(event.method_name, code, time.perf_counter() - started)
            for action in deferred:
                try:
                    action()
                except Exception:
                    log.exception("work after the reply of %s/%s failed", event.service_name,
                                  event.method_name)

    async def _request_message(self, stream: _EagerStream) -> Any:
        """The call's one request message (None if it has none), waited for at most
        `request_seconds` when it has not all arrived yet: a client that starts a request
        and never finishes it would hold its bytes, up to the message size limit a call, for
        as long as its connection lasts. (A request that is all there, the usual unary call,
        is read without a cancel scope: they cost some 10 µs in Trio.)"""
        if stream.request_complete():
            return await _one_message(stream)
        with trio.move_on_after(self._request_seconds):
            return await _one_message(stream)
        raise _RequestTooSlow(f"the request did not arrive in full within "
                              f"{self._request_seconds:g} s")

    async def _handle(self, stream: _EagerStream, event: RequestReceived,
                      method: Method, certificate: Any, started: float) -> str:
        """Read the call's request, run its handler and answer; the status code it ended with
        (a cancellation propagates).

        A call starts only while the connection owes its client at most `_MAX_UNSENT` bytes:
        a client that sends calls but does not read their replies gets few of them run, and
        none holds a reply meanwhile. (The connection goes on reading it: a client may write
        a large request before it reads.)"""
        if stream._socket.backlogged():
            await stream._socket.wait_backlog()
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
            try:
                raw = await self._request_message(stream)
                if raw is None:
                    refused = getattr(stream._end_stream_event, "refused", None)
                    if refused is not None:
                        # The connection has answered the call itself (a message it could
                        # not read: too large, or compressed in a way it cannot undo).
                        _tell_refused(method, event, refused, started)
                        return str(refused.status_code.name)
                    raise _BadRequest("the request has no message")
                if len(raw) > self._max_request_bytes:
                    raise LimitExceeded(
                        f"request: {len(raw)} bytes, over the limit of {self._max_request_bytes}"
                    )
            except _BadRequest as bad:
                _tell_refused(method, event, Status(StatusCode.INVALID_ARGUMENT, str(bad)),
                              started)
                raise
            except _RequestTooSlow as slow:
                _tell_refused(method, event, Status(StatusCode.DEADLINE_EXCEEDED, str(slow)),
                              started)
                raise
            except LimitExceeded as over:
                _tell_refused(method, event,
                              Status(StatusCode.RESOURCE_EXHAUSTED, over.message), started)
                raise
            if method.unary is not None:
                reply = await method.unary(bytes(raw), event)
                await stream.send_unary(reply)
                return "OK"
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
            return "OK"
        except CLIENT_GONE:
            # The client cancelled or disconnected: nobody is left to answer.
            log.debug("client went away during %s/%s", event.service_name, event.method_name)
            return "CANCELLED"
        except EventStoreError as error:
            status, trailers = to_status(error)
        except _BadRequest as bad:
            status, trailers = Status(StatusCode.INVALID_ARGUMENT, status_message=str(bad)), []
        except _RequestTooSlow as slow:
            status, trailers = Status(StatusCode.DEADLINE_EXCEEDED, status_message=str(slow)), []
        except Exception:
            log.exception("unexpected error in %s/%s", event.service_name, event.method_name)
            status, trailers = internal_error(), []
        with contextlib.suppress(*CLIENT_GONE):  # then nobody is left to tell
            await stream.close(status, custom_metadata=trailers)
        return str(status.status_code.name)


def _tell_refused(method: Method, event: RequestReceived, status: Status,
                  started: float) -> None:
    """Tell `method` of its call answered with `status` by the transport (see
    `Method.refused`)."""
    if method.refused is None:
        return
    code = status.status_code
    try:
        method.refused(event, _REFUSAL_OUTCOMES.get(code, code.name), status.status_message,
                       time.perf_counter() - started)
    except Exception:
        log.exception("telling %s/%s of its refused call failed", event.service_name,
                      event.method_name)


async def _one_message(stream: _EagerStream) -> Any:
    """The request's message (None if it has none) and its end."""
    raw = await stream.receive_message()
    if raw is not None and await stream.receive_message() is not None:
        raise _BadRequest("expected exactly one request message")
    return raw


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


class _RequestTooSlow(Exception):
    """The request did not arrive in full within `request_seconds`."""
