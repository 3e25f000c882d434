"""Two real gRPC clients with one calling convention, so each API rule is tested through both:
purerpc (async, the stack's own) and grpcio (Google's, run in a worker thread)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import purerpc
import trio
from google.protobuf.message import Message

from eventstore.v1 import eventstore_grpc
from eventstore.v1 import eventstore_pb2 as pb

SERVICE = "eventstore.v1.EventStoreService"
M = TypeVar("M", bound=Message)

RESPONSE_TYPES: dict[str, type[Message]] = {
    "AppendEvents": pb.AppendEventsResponse,
    "GetEvents": pb.GetEventsResponse,
    "ReadAll": pb.ReadAllResponse,
    "GetSnapshot": pb.GetSnapshotResponse,
    "SaveSnapshot": pb.SaveSnapshotResponse,
}


@dataclass
class RpcError(Exception):
    """A call ended with a non-OK status. `code` is the status name, e.g. "ABORTED"."""

    code: str
    message: str
    trailers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PurerpcClient:
    name = "purerpc"

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int, host: str = "127.0.0.1") -> AsyncIterator[PurerpcClient]:
        async with purerpc.insecure_channel(host, port) as channel:
            yield cls(eventstore_grpc.EventStoreServiceStub(channel))

    async def call(self, method: str, request: Message) -> Any:
        try:
            return await getattr(self._stub, method)(request)
        except purerpc.RpcFailedError as exc:
            raise RpcError(exc.status.status_code.name, exc.status.status_message) from None


class GrpcioClient:
    name = "grpcio"

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self._channel = grpc.insecure_channel(f"{host}:{port}")

    def close(self) -> None:
        self._channel.close()

    def call_sync(self, method: str, request: Message) -> Any:
        response_type = RESPONSE_TYPES[method]
        rpc = self._channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        try:
            return rpc(request, timeout=30)
        except grpc.RpcError as exc:
            trailers = {k: v for k, v in (exc.trailing_metadata() or ())}  # type: ignore[attr-defined]
            raise RpcError(exc.code().name, exc.details() or "", trailers) from None  # type: ignore[attr-defined]

    async def call(self, method: str, request: Message) -> Any:
        return await trio.to_thread.run_sync(self.call_sync, method, request)

    def stream_sync(self, method: str, request: Message) -> Any:
        rpc = self._channel.unary_stream(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.EventNotification.FromString,
        )
        return rpc(request)
