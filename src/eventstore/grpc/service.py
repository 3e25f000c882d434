"""EventStoreService: decode a request, call the store, return the serialized reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from purerpc.grpclib.events import RequestReceived

from eventstore import _es_codec as codec
from eventstore.config import Settings
from eventstore.errors import InvalidArgument, LimitExceeded
from eventstore.grpc.status import Unimplemented
from eventstore.grpc.transport import Method
from eventstore.store.reader import Reader
from eventstore.store.validation import (
    parse_filter,
    parse_position_range,
    parse_stream_range,
)
from eventstore.store.writer import AppendWriter
from eventstore.v1 import eventstore_pb2 as pb

SERVICE_NAME = "eventstore.v1.EventStoreService"

_M = TypeVar("_M", bound=Message)


def decode(message_type: type[_M], raw: bytes) -> _M:
    message = message_type()
    try:
        message.ParseFromString(raw)
    except DecodeError:
        raise InvalidArgument(
            f"request: not a valid {message_type.DESCRIPTOR.name} message"
        ) from None
    return message


def parse_append(raw: bytes, settings: Settings) -> codec.AppendRequest:
    """Validate an AppendEventsRequest (in Rust) and translate its errors to the domain's."""
    try:
        return codec.AppendRequest.parse(
            raw, settings.max_events_per_request, settings.max_event_bytes
        )
    except codec.RequestTooLarge as exc:
        raise LimitExceeded(str(exc)) from None
    except codec.InvalidRequest as exc:
        raise InvalidArgument(str(exc)) from None


class EventStoreService:
    def __init__(self, settings: Settings, writer: AppendWriter, reader: Reader) -> None:
        self._settings = settings
        self._writer = writer
        self._reader = reader

    def methods(self) -> dict[str, Method]:
        prefix = SERVICE_NAME + "/"
        return {
            prefix + "AppendEvents": Method(unary=self.append_events),
            prefix + "GetEvents": Method(unary=self.get_events),
            prefix + "ReadAll": Method(unary=self.read_all),
            prefix + "GetSnapshot": Method(unary=self.get_snapshot),
            prefix + "SaveSnapshot": Method(unary=self.save_snapshot),
            prefix + "SubscribeToStream": Method(stream=self.subscribe_to_stream),
            prefix + "SubscribeToAll": Method(stream=self.subscribe_to_all),
        }

    async def append_events(self, raw: bytes, request: RequestReceived) -> bytes:
        return await self._writer.append(parse_append(raw, self._settings))

    async def get_events(self, raw: bytes, request: RequestReceived) -> bytes:
        msg = decode(pb.GetEventsRequest, raw)
        query = parse_stream_range(
            msg.stream_id,
            msg.stream_type,
            msg.from_version,
            msg.to_version if msg.HasField("to_version") else None,
            msg.max_count,
            msg.include_snapshot,
            default_page=self._settings.read_page_default,
            max_page=self._settings.read_page_max,
        )
        return await self._reader.get_events(query)

    async def read_all(self, raw: bytes, request: RequestReceived) -> bytes:
        msg = decode(pb.ReadAllRequest, raw)
        query = parse_position_range(
            msg.from_position,
            msg.max_count,
            parse_filter(msg.filter.stream_types, msg.filter.event_type_prefixes),
            default_page=self._settings.read_page_default,
            max_page=self._settings.read_page_max,
        )
        return await self._reader.read_all(query)

    async def get_snapshot(self, raw: bytes, request: RequestReceived) -> bytes:
        raise Unimplemented("GetSnapshot is not implemented yet")

    async def save_snapshot(self, raw: bytes, request: RequestReceived) -> bytes:
        raise Unimplemented("SaveSnapshot is not implemented yet")

    async def subscribe_to_stream(self, raw: bytes,
                                  request: RequestReceived) -> AsyncIterator[bytes]:
        raise Unimplemented("SubscribeToStream is not implemented yet")
        yield b""  # pragma: no cover - makes this an async generator

    async def subscribe_to_all(self, raw: bytes, request: RequestReceived) -> AsyncIterator[bytes]:
        raise Unimplemented("SubscribeToAll is not implemented yet")
        yield b""  # pragma: no cover
