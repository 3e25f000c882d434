"""Clients for the security tests: purerpc and grpcio with one calling convention (as in
tests/clients.py), plus credentials (gRPC metadata) and TLS / mTLS.

`open_client(kind, port, metadata=..., tls=...)` gives a client whose `call(method, request)`
runs a unary RPC and whose `stream(method, request)` opens a server-streaming RPC; non-OK
statuses are `RpcError(code, message)`. Everything is on 127.0.0.1 and bounded in time.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import purerpc
import trio
from google.protobuf.message import Message

from eventstore.v1 import eventstore_grpc
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import RESPONSE_TYPES, SERVICE, RpcError

HOST = "127.0.0.1"
CLIENTS = ("purerpc", "grpcio")
STREAMING = ("SubscribeToStream", "SubscribeToAll")
# A unary call through grpcio gives up after this long (a hang is a failure, not a wait).
CALL_TIMEOUT = 15.0

Metadata = tuple[tuple[str, str], ...]


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def x_api_key(key: str) -> Metadata:
    return (("x-api-key", key),)


@dataclass(frozen=True)
class Tls:
    """PEM files a client uses: the CA it trusts and, for mTLS, its certificate and key."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        ctx.set_alpn_protocols(["h2"])
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file),
                                str(self.key_file) if self.key_file else None)
        return ctx

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


class Stream:
    """An open server-streaming call: `await next()` is the next notification; an error status
    is raised as RpcError, the end of the stream as RpcError("ENDED", ...)."""

    async def next(self) -> pb.EventNotification:  # pragma: no cover - interface
        raise NotImplementedError


# -- purerpc -------------------------------------------------------------------------------


class _PurerpcStream(Stream):
    def __init__(self, notes: Any) -> None:
        self._notes = notes

    async def next(self) -> pb.EventNotification:
        try:
            return await self._notes.__anext__()  # type: ignore[no-any-return]
        except StopAsyncIteration:
            raise RpcError("ENDED", "the stream ended without a status") from None
        except purerpc.RpcFailedError as exc:
            raise RpcError(exc.status.status_code.name, exc.status.status_message) from None


class SecurePurerpc:
    name = "purerpc"

    def __init__(self, stub: Any, metadata: Metadata) -> None:
        self._stub = stub
        self.metadata = metadata

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int, metadata: Metadata = (),
                      tls: Tls | None = None) -> AsyncIterator[SecurePurerpc]:
        channel = (purerpc.secure_channel(HOST, port, tls.ssl_context()) if tls is not None
                   else purerpc.insecure_channel(HOST, port))
        try:
            async with channel:
                yield cls(eventstore_grpc.EventStoreServiceStub(channel), metadata)
        finally:
            # purerpc 0.8 leaves its socket open; close it so the server sees the client go.
            grpc_socket = getattr(channel, "_grpc_socket", None)
            sock = getattr(getattr(grpc_socket, "_socket", None), "_stream", None)
            if sock is None:
                sock = getattr(grpc_socket, "_socket", None)
            if sock is not None and hasattr(sock, "aclose"):
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await sock.aclose()

    async def call(self, method: str, request: Message,
                   metadata: Metadata | None = None) -> Any:
        md = self.metadata if metadata is None else metadata
        try:
            return await getattr(self._stub, method)(request, metadata=md)
        except purerpc.RpcFailedError as exc:
            raise RpcError(exc.status.status_code.name, exc.status.status_message) from None

    @asynccontextmanager
    async def stream(self, method: str, request: Message,
                     metadata: Metadata | None = None) -> AsyncIterator[Stream]:
        md = self.metadata if metadata is None else metadata
        async with aclosing(getattr(self._stub, method)(request, metadata=md)) as notes:
            yield _PurerpcStream(notes)


# -- grpcio --------------------------------------------------------------------------------


class _GrpcioStream(Stream):
    def __init__(self, call: Any) -> None:
        self._call = call

    def _next_sync(self) -> pb.EventNotification:
        try:
            return next(self._call)  # type: ignore[no-any-return]
        except StopIteration:
            raise RpcError("ENDED", "the stream ended without a status") from None
        except grpc.RpcError as exc:
            raise RpcError(exc.code().name, exc.details() or "") from None  # type: ignore[attr-defined]

    async def next(self) -> pb.EventNotification:
        return await trio.to_thread.run_sync(self._next_sync, abandon_on_cancel=True)


class SecureGrpcio:
    name = "grpcio"

    def __init__(self, port: int, metadata: Metadata = (), tls: Tls | None = None) -> None:
        target = f"{HOST}:{port}"
        self._channel = (grpc.secure_channel(target, tls.grpc_credentials())
                         if tls is not None else grpc.insecure_channel(target))
        self.metadata = metadata

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int, metadata: Metadata = (),
                      tls: Tls | None = None) -> AsyncIterator[SecureGrpcio]:
        client = cls(port, metadata, tls)
        try:
            yield client
        finally:
            client.close()

    def close(self) -> None:
        self._channel.close()

    def call_sync(self, method: str, request: Message, metadata: Metadata | None = None) -> Any:
        md = self.metadata if metadata is None else metadata
        rpc = self._channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=RESPONSE_TYPES[method].FromString,
        )
        try:
            return rpc(request, metadata=md or None, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            raise RpcError(exc.code().name, exc.details() or "") from None  # type: ignore[attr-defined]

    async def call(self, method: str, request: Message,
                   metadata: Metadata | None = None) -> Any:
        return await trio.to_thread.run_sync(self.call_sync, method, request, metadata,
                                             abandon_on_cancel=True)

    @asynccontextmanager
    async def stream(self, method: str, request: Message,
                     metadata: Metadata | None = None) -> AsyncIterator[Stream]:
        md = self.metadata if metadata is None else metadata
        rpc = self._channel.unary_stream(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.EventNotification.FromString,
        )
        call = rpc(request, metadata=md or None)
        try:
            yield _GrpcioStream(call)
        finally:
            call.cancel()


Client = SecurePurerpc | SecureGrpcio


def open_client(kind: str, port: int, metadata: Metadata = (),
                tls: Tls | None = None) -> AbstractAsyncContextManager[Any]:
    """A client of `kind` ("purerpc" or "grpcio") that sends `metadata` on every call."""
    if kind == "purerpc":
        return SecurePurerpc.connect(port, metadata, tls)
    assert kind == "grpcio", kind
    return SecureGrpcio.connect(port, metadata, tls)


async def first_note(client: Any, method: str, request: Message,
                     metadata: Metadata | None = None,
                     seconds: float = 10) -> pb.EventNotification:
    """The first notification of a subscription (or its error status, raised)."""
    with trio.fail_after(seconds):
        async with client.stream(method, request, metadata) as notes:
            return await notes.next()  # type: ignore[no-any-return]


async def status(client: Any, method: str, request: Message,
                 metadata: Metadata | None = None) -> tuple[str, str]:
    """(status name, message) of one call: "OK" for a unary success or for a subscription
    whose first notification arrives."""
    try:
        with trio.fail_after(20):
            if method in STREAMING:
                await first_note(client, method, request, metadata)
            else:
                await client.call(method, request, metadata)
    except RpcError as err:
        return err.code, err.message
    return "OK", ""


# -- plain helpers -------------------------------------------------------------------------
