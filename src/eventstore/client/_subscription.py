"""Subscriptions that resume by themselves.

A `Subscription` is one logical subscription made of as many server calls as it takes: when
the connection drops, the server restarts or shuts down (UNAVAILABLE), or nothing arrives for
too long, it reconnects with backoff (`ReconnectPolicy`) and resubscribes from what it has
delivered to its consumer, so the consumer sees every event once, in order, with no gap.

Resume point (only what `__anext__` has returned counts as delivered):

- SubscribeToAll, and SubscribeToStream without a stream id: `from_position` = the largest of
  the last delivered event's position, the last checkpoint's position and the CaughtUp
  position (every matching event up to each of them has been delivered);
  `include_existing` = True.
- SubscribeToStream with a stream id: `from_version` = the last delivered event's version
  (before any: the requested `from_version`, or 0 when the subscription started with
  `include_existing` = False, with everything up to its CaughtUp position skipped as below);
  `include_existing` = True.
- A subscription with `include_existing` = False is anchored by its first CaughtUp; if the
  connection drops before that arrives, the resubscribe starts afresh (nothing was delivered).

Events at or below the delivered position are dropped (and logged): a resubscribed server
never sends them, this guards the no-duplicate promise anyway. Checkpoints below it are
dropped too, so positions the consumer sees never go backwards.

CaughtUp is delivered once per Subscription: the server sends one on every call, and those
after a resubscribe are not passed on when one was already delivered (they still advance the
resume point). If the connection drops during the catch-up, the first CaughtUp after the
resubscribe is the one delivered. So `CaughtUp` keeps its meaning "history is behind you",
and a consumer does not rerun its "now live" step on every reconnect; it can watch
`Subscription.reconnects` if it cares.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import trio

from eventstore.client import _convert as convert
from eventstore.client._transport import Connection, ended_error
from eventstore.client.errors import (
    ClientError,
    DeadlineExceeded,
    Unavailable,
    translating,
)
from eventstore.client.models import (
    CaughtUp,
    Checkpoint,
    ReconnectPolicy,
    RecordedEvent,
    SubscriptionItem,
)
from eventstore.v1 import eventstore_pb2 as pb

if TYPE_CHECKING:
    from eventstore.client._client import EventStoreClient

log = logging.getLogger("eventstore.client")


@dataclass(frozen=True)
class SubscriptionRequest:
    """What the caller asked for (the first call's request)."""

    method: Literal["SubscribeToStream", "SubscribeToAll"]
    stream_type: str = ""
    stream_id: str | None = None
    from_version: int = 0
    from_position: int = 0
    include_existing: bool = True
    stream_types: tuple[str, ...] = ()
    event_type_prefixes: tuple[str, ...] = ()
    max_batch_size: int = 0
    checkpoint_interval_ms: int = 0


def _retryable(error: ClientError) -> bool:
    return isinstance(error, (Unavailable, DeadlineExceeded))


class Subscription:
    """An async iterator of `RecordedEvent`, `Checkpoint` and `CaughtUp` (batches arrive as
    single events), and an async context manager that closes it:

        async with client.subscribe_to_all(stream_types=["Order"]) as subscription:
            async for item in subscription:
                ...

    It resumes by itself after a lost connection, a server restart or UNAVAILABLE (see the
    module's docstring for exactly where it resumes and why CaughtUp comes once). Any other
    status (INVALID_ARGUMENT, UNAUTHENTICATED, …) ends it: `__anext__` raises the status's
    `ClientError`, and the iteration is over. So does giving up (`ReconnectPolicy.max_attempts`
    reconnection attempts that all failed): it raises `Unavailable`. It is not meant to be
    iterated by two tasks at once. Without `async with`/`aclose`, its connection stays open
    until the client closes.
    """

    def __init__(self, client: EventStoreClient, request: SubscriptionRequest,
                 policy: ReconnectPolicy) -> None:
        self._client = client
        self._request = request
        self._policy = policy
        self._by_version = request.method == "SubscribeToStream" and request.stream_id is not None
        self._position = 0 if self._by_version else request.from_position
        self._version: int | None = None
        # Where to resume is known from the start, or (include_existing=False) once CaughtUp.
        self._anchored = request.include_existing
        self._caught_up = False
        # The call re-reads events the consumer has (see `_wire_request`): drop them quietly.
        self._replaying = False
        self._pending: deque[SubscriptionItem] = deque()
        self._connection: Connection | None = None
        self._stream: Any = None
        self._failures = 0
        self._last_error: ClientError | None = None
        self._calls = 0
        self._done = False
        self._busy = False
        idle = policy.idle_timeout
        if idle is not None:
            idle = max(idle, 3 * request.checkpoint_interval_ms / 1000)
        self._idle_timeout = math.inf if idle is None else idle

    # -- what a consumer may look at -------------------------------------------------------

    @property
    def position(self) -> int:
        """The position up to which every matching event has been delivered (0 until known
        for a single-stream subscription): pass it as `from_position` to continue later."""
        return self._position

    @property
    def version(self) -> int | None:
        """With a stream id: the version of the last delivered event (None before one)."""
        return self._version

    @property
    def caught_up(self) -> bool:
        """True once CaughtUp has been delivered."""
        return self._caught_up

    @property
    def reconnects(self) -> int:
        """How many times the subscription has resubscribed."""
        return max(0, self._calls - 1)

    # -- iteration ---------------------------------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> SubscriptionItem:
        if self._busy:
            raise RuntimeError("another task is already iterating this subscription")
        self._busy = True
        try:
            return await self._next()
        finally:
            self._busy = False

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the subscription and close its connection (idempotent)."""
        self._done = True
        self._pending.clear()
        connection, self._connection, self._stream = self._connection, None, None
        if connection is not None:
            await connection.aclose()

    async def _next(self) -> SubscriptionItem:
        while True:
            while self._pending:
                item = self._pending.popleft()
                if self._admit(item):
                    return item
            if self._done:
                raise StopAsyncIteration
            if self._stream is None:
                await self._subscribe()
                continue
            try:
                message = await self._receive()
            except ClientError as error:
                self._lost(error)
                continue
            self._failures = 0
            self._unpack(message)

    # -- the resume logic --------------------------------------------------------------------

    def _admit(self, item: SubscriptionItem) -> bool:
        """Whether to hand `item` to the consumer; advances the resume point if so."""
        if isinstance(item, RecordedEvent):
            if item.position <= self._position:
                if not self._replaying:
                    log.warning("subscription: dropped an event the consumer already has",
                                extra={"position": item.position,
                                       "delivered": self._position})
                return False
            self._position = item.position
            if self._by_version:
                self._version = item.version
            return True
        if isinstance(item, Checkpoint):
            if item.position < self._position:
                return False
            self._position = item.position
            return True
        # CaughtUp: everything up to its position has been delivered.
        self._position = max(self._position, item.position)
        self._anchored = True
        if self._caught_up:
            return False
        self._caught_up = True
        return True

    def _resume_text(self) -> str:
        if not self._anchored:
            return "nothing (starting afresh)"
        if self._by_version and self._version is not None:
            return f"version {self._version}"
        return f"position {self._position}"

    def _wire_request(self) -> Any:
        r = self._request
        self._replaying = False
        resume = self._anchored
        include_existing = True if resume else r.include_existing
        if r.method == "SubscribeToAll":
            return pb.SubscribeAllRequest(
                from_position=self._position if resume else r.from_position,
                include_existing=include_existing,
                filter=pb.Filter(stream_types=list(r.stream_types),
                                 event_type_prefixes=list(r.event_type_prefixes)),
                max_batch_size=r.max_batch_size,
                checkpoint_interval_ms=r.checkpoint_interval_ms)
        if self._by_version:
            from_version = r.from_version
            if resume:
                if self._version is not None:
                    from_version = self._version
                elif not r.include_existing:
                    # Anchored by CaughtUp alone: re-read the stream, and `_admit` drops what
                    # lies at or below the CaughtUp position.
                    from_version = 0
                    self._replaying = True
            # from_position goes as given: the server refuses anything but 0 here.
            return pb.SubscribeRequest(
                stream_type=r.stream_type, stream_id=r.stream_id, from_version=from_version,
                from_position=r.from_position, include_existing=include_existing,
                max_batch_size=r.max_batch_size,
                checkpoint_interval_ms=r.checkpoint_interval_ms)
        # from_version goes as given: the server refuses anything but 0 without a stream id.
        return pb.SubscribeRequest(
            stream_type=r.stream_type, from_version=r.from_version,
            from_position=self._position if resume else r.from_position,
            include_existing=include_existing, max_batch_size=r.max_batch_size,
            checkpoint_interval_ms=r.checkpoint_interval_ms)

    def _unpack(self, message: Any) -> None:
        kind = message.WhichOneof("kind")
        if kind == "event":
            self._pending.append(convert.recorded_event(message.event))
        elif kind == "batch":
            self._pending.extend(convert.recorded_event(e) for e in message.batch.events)
        elif kind == "checkpoint":
            self._pending.append(Checkpoint(message.checkpoint.position))
        elif kind == "caught_up":
            self._pending.append(CaughtUp(message.caught_up.position))
        # Anything else is from a newer contract: ignored.

    # -- connections -------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        client = self._client
        policy = self._policy
        while True:
            if self._failures:
                if policy.max_attempts is not None and self._failures > policy.max_attempts:
                    self._done = True
                    last = self._last_error
                    raise Unavailable(
                        f"gave up after {self._failures} consecutive failures to (re)subscribe "
                        f"to {client.target}: {last.message if last else 'no reason'}"
                    ) from last
                delay = policy.delay(self._failures)
                log.warning(
                    "%s to %s failed (%s); attempt %d in %.2f s, resuming after %s",
                    self._request.method, client.target, self._last_error, self._failures,
                    delay, self._resume_text(),
                    extra={"target": client.target, "attempt": self._failures,
                           "delay_s": round(delay, 3), "reason": str(self._last_error),
                           "position": self._position, "version": self._version})
                await trio.sleep(delay)
            if client.closed:
                self._done = True
                raise RuntimeError("the EventStoreClient is closed")
            try:
                connection, stream = await self._call()
            except ClientError as error:
                if not _retryable(error):
                    self._done = True
                    raise
                self._failures += 1
                self._last_error = error
                continue
            if self._done:  # closed by another task meanwhile
                connection.close()
                return
            self._connection, self._stream = connection, stream
            self._calls += 1
            return

    async def _call(self) -> tuple[Connection, Any]:
        """A new connection with this subscription's call started on it."""
        client = self._client
        connection: Connection | None = None
        timeout = self._policy.connect_timeout
        try:
            with trio.move_on_after(timeout):
                connection = await client._dial(timeout)
                with translating(client.target):
                    stream = await connection.open_stream(
                        self._request.method, pb.EventNotification, client._metadata)
                    connection.calls += 1  # for the keepalive; the call ends with it
                    await connection.send_request(stream, self._wire_request())
                return connection, stream
            raise DeadlineExceeded(f"could not subscribe to {client.target} within "
                                   f"{timeout:g} s")
        except BaseException:
            if connection is not None:
                connection.close()
            raise

    async def _receive(self) -> Any:
        stream = self._stream
        target = self._client.target
        with trio.move_on_after(self._idle_timeout), translating(target):
            message = await stream.receive_message()
            if message is None:
                raise (ended_error(stream)
                       or Unavailable(f"{target} ended the subscription"))
            return message
        raise Unavailable(f"nothing from {target} for {self._idle_timeout:g} s; "
                          "the connection is presumed dead")

    def _lost(self, error: ClientError) -> None:
        connection, self._connection, self._stream = self._connection, None, None
        if connection is not None:
            connection.close()
        if not _retryable(error):
            self._done = True
            raise error
        self._failures += 1
        self._last_error = error
