"""`eventstore tail`: follow the store through a resuming SubscribeToAll, one JSON line per
event on stdout."""

from __future__ import annotations

import signal
import ssl
from collections.abc import Sequence
from typing import BinaryIO

import orjson
import trio

from eventstore.client._client import EventStoreClient
from eventstore.client.errors import ClientError
from eventstore.client.models import RecordedEvent


def event_line(event: RecordedEvent) -> bytes:
    """One event as a JSON line; `data` and `metadata` as JSON values (metadata null when
    none), `created_at` in ISO 8601 (UTC)."""
    return orjson.dumps({
        "event_id": event.event_id,
        "stream_id": event.stream_id,
        "stream_type": event.stream_type,
        "version": event.version,
        "event_type": event.event_type,
        "position": event.position,
        "created_at": event.created_at.isoformat(),
        "data": event.json(),
        "metadata": event.metadata_json(),
    }) + b"\n"


async def tail(host: str, port: int, out: BinaryIO, *, from_position: int = 0,
               stream_types: Sequence[str] = (), event_type_prefixes: Sequence[str] = (),
               include_existing: bool = True, api_key: str | None = None,
               count: int | None = None, tls: ssl.SSLContext | None = None) -> None:
    """Write matching events to `out` until `count` events were written, SIGINT/SIGTERM, or a
    non-retryable error (raised as `ClientError`). A closed `out` (a pipe's reader left) ends
    it quietly."""
    error: ClientError | None = None
    async with trio.open_nursery() as nursery:
        stop = trio.CancelScope()
        nursery.start_soon(_stop_on_signal, stop)
        try:
            with stop:
                await _follow(host, port, out, from_position=from_position,
                              stream_types=stream_types, event_type_prefixes=event_type_prefixes,
                              include_existing=include_existing, api_key=api_key, count=count,
                              tls=tls)
        except ClientError as exc:
            error = exc
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def _stop_on_signal(stop: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.cancel()
            return


async def _follow(host: str, port: int, out: BinaryIO, *, from_position: int,
                  stream_types: Sequence[str], event_type_prefixes: Sequence[str],
                  include_existing: bool, api_key: str | None, count: int | None,
                  tls: ssl.SSLContext | None) -> None:
    written = 0
    async with EventStoreClient.connect(host, port, api_key=api_key, tls=tls) as client:
        subscription = client.subscribe_to_all(
            from_position=from_position, include_existing=include_existing,
            stream_types=stream_types, event_type_prefixes=event_type_prefixes)
        async with subscription:
            async for item in subscription:
                if not isinstance(item, RecordedEvent):
                    continue
                try:
                    out.write(event_line(item))
                    out.flush()
                except BrokenPipeError:
                    return
                written += 1
                if count is not None and written >= count:
                    return
