"""One HTTP/2 connection to the server, on purerpc's gRPC framing.

purerpc's own channel has three gaps that matter to a long-lived client:

- when the peer goes away (EOF, reset) its reader task just ends, and every call waiting on
  that connection waits forever; `_ClientSocket` ends those calls instead (they see
  `anyio.EndOfStream`, translated to `Unavailable`) and marks the connection lost, so the
  next call dials again;
- it never closes its socket (the garbage collector does); `Connection` closes it, so a
  closed subscription's server side notices at once;
- its channel enters task groups in the caller's task, which ties the connection's lifetime
  to one task's stack; a `Connection` lives in a task of the client's nursery instead, and any
  task may call through it;
- a peer that stops answering without closing the connection (a crashed host, a partition, a
  server that stopped serving but left its socket open) makes calls wait forever; while calls
  are open and nothing has arrived for `keepalive` seconds, `Connection` sends an HTTP/2 PING,
  and declares the connection lost when nothing arrives for another `keepalive` seconds.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import anyio
import anyio.abc
import trio
from google.protobuf.message import Message
from h2.errors import ErrorCodes
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import ResponseEnded

from eventstore.client.errors import ClientError, InternalError, Unavailable, error_from_status

log = logging.getLogger("eventstore.client")

SERVICE = "eventstore.v1.EventStoreService"
USER_AGENT = "eventstore-python-client"
# How long closing a connection may take (flushing what is queued, the TLS goodbye).
CLOSE_SECONDS = 1.0

Metadata = tuple[tuple[str, str], ...]


class _Monitored(anyio.abc.ByteStream):
    """A byte stream that remembers when it last received something."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self._inner = inner
        self.last_received = trio.current_time()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._inner.receive(max_bytes)
        self.last_received = trio.current_time()
        return data

    async def send(self, item: bytes) -> None:
        await self._inner.send(item)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self._inner.extra_attributes


class _ClientSocket(GRPCProtoSocket):  # type: ignore[misc]  # purerpc is untyped
    """purerpc's client socket, but a connection that ends ends the calls waiting on it."""

    def __init__(self, config: Any, stream: Any, on_lost: trio.Event) -> None:
        super().__init__(config, stream)
        self.lost = False
        self._on_lost = on_lost

    async def _reader_thread(self) -> None:
        try:
            await super()._reader_thread()
        finally:
            # No checkpoint from here to the end: a call checks `lost` and starts its stream
            # without one either, so no stream can slip in after this loop.
            self.lost = True
            for stream in list(self._streams.values()):
                # Receivers get their buffered events, then EndOfStream.
                stream._incoming_events[0].close()
            self._on_lost.set()


class Connection:
    """A connection run by `run` in a nursery task; calls go through `open_stream`/`unary`."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, *,
                 keepalive: float | None = None) -> None:
        self.host = host
        self.port = port
        self.target = f"{host}:{port}"
        self._keepalive = keepalive
        # Calls in progress (the keepalive only pings while there are some).
        self.calls = 0
        self._ssl_context = ssl_context
        self._scheme = "https" if ssl_context is not None else "http"
        self._socket: _ClientSocket | None = None
        self._scope = trio.CancelScope()
        # Set when the connection can no longer carry calls; `closed` once it is torn down.
        self.lost = trio.Event()
        self.closed = trio.Event()

    @property
    def usable(self) -> bool:
        return self._socket is not None and not self._socket.lost and not self.lost.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Dial, report started, and keep the connection until it is lost or `close`d.
        Failures before `started` propagate to the starter; later ones only end the
        connection."""
        started = False
        try:
            stream: anyio.abc.ByteStream
            if self._ssl_context is None:
                stream = await anyio.connect_tcp(self.host, self.port)
            else:
                # purerpc's secure_channel dials the same way (no TLS close_notify wait).
                stream = await anyio.connect_tcp(self.host, self.port,
                                                 ssl_context=self._ssl_context,
                                                 tls_standard_compatible=False)
            try:
                with self._scope:
                    config = GRPCConfiguration(client_side=True, user_agent=USER_AGENT)
                    monitored = _Monitored(stream)
                    async with _ClientSocket(config, monitored, self.lost) as grpc_socket:
                        self._socket = grpc_socket
                        started = True
                        task_status.started()
                        async with trio.open_nursery() as nursery:
                            if self._keepalive is not None:
                                nursery.start_soon(self._watchdog, grpc_socket, monitored,
                                                   self._keepalive)
                            await self.lost.wait()
                            nursery.cancel_scope.cancel()
                        # Leaving flushes what is queued; never wait long for a dead peer.
                        self._scope.deadline = trio.current_time() + CLOSE_SECONDS
            finally:
                self.lost.set()
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
                    try:
                        await stream.aclose()
                    except Exception as exc:
                        log.debug("closing the connection to %s: %s", self.target,
                                  type(exc).__name__)
        except Exception as exc:
            if not started:
                raise
            log.debug("connection to %s ended: %s", self.target, type(exc).__name__)
        except BaseExceptionGroup as group:
            if not started:
                raise
            # The connection failed just as the client's nursery was cancelled (a server that
            # refuses our certificate after a TLS 1.3 handshake ends the connection during the
            # first call): the failure only ends the connection; the cancellation goes on.
            failures, rest = group.split(Exception)
            if failures is not None:
                log.debug("connection to %s ended: %s", self.target, failures)
            if rest is not None:
                raise rest from None
        finally:
            self.lost.set()
            self.closed.set()

    async def _watchdog(self, grpc_socket: Any, monitored: _Monitored, keepalive: float,
                        ) -> None:
        pinged_at: float | None = None
        while True:
            await trio.sleep(keepalive / 4)
            now = trio.current_time()
            if self.calls == 0 or now - monitored.last_received < keepalive:
                pinged_at = None
                continue
            if pinged_at is None or monitored.last_received > pinged_at:
                pinged_at = now
                grpc_socket._grpc_connection.h2_connection.ping(b"esclient")
                await grpc_socket._socket.flush()
            elif now - pinged_at >= keepalive:
                log.warning("connection to %s: no answer to a keepalive ping; closing it",
                            self.target)
                self.close()
                return

    def close(self) -> None:
        """Tear the connection down (calls on it end with `Unavailable`). Does not wait."""
        self.lost.set()
        self._scope.cancel()

    async def aclose(self) -> None:
        """`close`, and wait until the socket is closed."""
        self.close()
        with trio.CancelScope(shield=True), trio.move_on_after(2 * CLOSE_SECONDS):
            await self.closed.wait()

    async def open_stream(self, method: str, response_type: type[Message],
                          metadata: Metadata) -> Any:
        """Start a call; returns purerpc's GRPCProtoStream. No checkpoint before the stream
        exists (see `_ClientSocket`)."""
        grpc_socket = self._socket
        if grpc_socket is None or grpc_socket.lost or self.lost.is_set():
            raise Unavailable(f"the connection to {self.target} was lost")
        stream = await grpc_socket.start_request(
            self._scheme, SERVICE, method, authority=self.target, custom_metadata=metadata)
        stream.expect_message_type(response_type)
        return stream

    async def send_request(self, stream: Any, request: Message) -> None:
        """Send the call's only request message and half-close."""
        await stream.send_message(request)
        await stream.close()

    async def unary(self, method: str, request: Message, response_type: type[Message],
                    metadata: Metadata) -> Any:
        """One unary call: the reply, or the status's `ClientError`."""
        stream = await self.open_stream(method, response_type, metadata)
        finished = False
        self.calls += 1
        try:
            await self.send_request(stream, request)
            reply = await stream.receive_message()
            if reply is None:
                raise ended_error(stream) or InternalError(f"{method}: the server sent no reply")
            if await stream.receive_message() is not None:
                raise InternalError(f"{method}: the server sent more than one reply")
            error = ended_error(stream)
            if error is not None:
                raise error
            finished = True
            return reply
        finally:
            self.calls -= 1
            if not finished:
                self.abandon(stream)

    def abandon(self, stream: Any) -> None:
        """Reset a stream whose response we no longer read (cancelled, timed out, failed), so
        the server stops sending and its flow-control credit is not held forever."""
        if stream.end_stream_event is not None or not self.usable:
            return
        try:
            stream._grpc_connection.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
        except Exception as exc:  # the stream may already be closed on the h2 level
            log.debug("resetting stream %s: %s", stream.stream_id, type(exc).__name__)
            return
        stream._socket._flush_event.set()


def ended_error(stream: Any) -> ClientError | None:
    """The error a finished stream's status says, or None when it ended with OK."""
    event = stream.end_stream_event
    if not isinstance(event, ResponseEnded):
        return Unavailable("the call ended without a status")
    status = event.status
    if status.int_value == 0:
        return None
    return error_from_status(status.int_value, status.status_message, event.custom_metadata)
