"""What the client takes and returns: frozen msgspec Structs, independent of protobuf."""

from __future__ import annotations

import enum
import random
import uuid
from datetime import datetime
from typing import Any, TypeAlias

import msgspec
import orjson


class ExpectedVersion(enum.Enum):
    """Named values for `append_events(expected_version=...)` (an int N ≥ 1 means "exactly N")."""

    #: Append whatever the stream's version (the same as passing None).
    ANY = "any"
    #: The stream must not exist yet (the same as 0).
    NO_STREAM = 0
    #: The stream must already exist, at any version (the same as -1).
    STREAM_EXISTS = -1


class NewEvent(msgspec.Struct, frozen=True):
    """An event to append.

    `data` and `metadata` are JSON: `bytes` (also bytearray, memoryview) are sent as they are
    (they must be UTF-8 JSON); anything else is serialized with orjson (a `str` becomes a JSON
    string). `metadata` None means none; when given it must be a JSON object. `event_id` None
    lets the server assign one; give one (str or UUID) to make retries idempotent.
    """

    event_type: str
    data: Any
    metadata: Any = None
    event_id: str | uuid.UUID | None = None


class RecordedEvent(msgspec.Struct, frozen=True):
    """A stored event. `data` and `metadata` are the JSON bytes as the server returns them
    (PostgreSQL's rendering: equal as JSON values to what was appended); `metadata` is b""
    when the event has none. `created_at` is timezone-aware UTC."""

    event_id: str
    stream_id: str
    stream_type: str
    version: int
    event_type: str
    data: bytes
    metadata: bytes
    created_at: datetime
    position: int

    def json(self) -> Any:
        """`data`, parsed."""
        return orjson.loads(self.data)

    def metadata_json(self) -> Any:
        """`metadata`, parsed; None when the event has none."""
        return orjson.loads(self.metadata) if self.metadata else None


class AppendResult(msgspec.Struct, frozen=True):
    """What `append_events` returns: the stream's version after the append, the positions of
    the first and last event, the event ids as stored (in order), and whether the append
    crossed a multiple of the server's SNAPSHOT_THRESHOLD."""

    next_expected_version: int
    first_position: int
    last_position: int
    event_ids: tuple[str, ...]
    snapshot_due: bool


class Checkpoint(msgspec.Struct, frozen=True):
    """A subscription's progress: every matching event up to `position` has been delivered, so
    resuming after `position` loses nothing. Sent while the store is idle or the filter hides
    events."""

    position: int


class CaughtUp(msgspec.Struct, frozen=True):
    """A subscription has delivered everything committed before it went live (history was read
    up to `position`). Delivered once per `Subscription`, even when it resubscribes."""

    position: int


SubscriptionItem: TypeAlias = RecordedEvent | Checkpoint | CaughtUp


class Snapshot(msgspec.Struct, frozen=True):
    """A stored snapshot of a stream's state at `version`; `data` is JSON bytes."""

    snapshot_id: str
    stream_id: str
    stream_type: str
    version: int
    data: bytes
    created_at: datetime

    def json(self) -> Any:
        """`data`, parsed."""
        return orjson.loads(self.data)


class SavedSnapshot(msgspec.Struct, frozen=True):
    """What `save_snapshot` returns."""

    snapshot_id: str
    created_at: datetime


class ReconnectPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a subscription reconnects after a lost connection or UNAVAILABLE.

    The delay before the k-th consecutive attempt is `initial_backoff * multiplier**(k-1)`,
    capped at `max_backoff`, then shortened by a random fraction of at most `jitter` (so many
    clients do not reconnect in step). After `max_attempts` reconnection attempts that all
    fail (a failed dial or a stream that ends before its first message), the subscription ends
    with `Unavailable`: that is `max_attempts + 1` consecutive failures, counting the drop or
    first dial that started them (0: give up at the first); None (the default) never gives
    up, because a
    subscriber usually feeds a long-running projection that should outlive a store restart or
    outage (each failure is logged as a warning on the "eventstore.client" logger).

    `connect_timeout` bounds one connection attempt. `idle_timeout` declares a connection dead
    when nothing (not even a checkpoint) arrived for that long; the server sends something at
    least every checkpoint interval (2 s at most when idle), so this catches a silently dead
    peer long before TCP keepalive would. It is raised to at least 3 × the subscription's
    `checkpoint_interval_ms`. None disables it.
    """

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None
    connect_timeout: float = 10.0
    idle_timeout: float | None = 30.0

    def __post_init__(self) -> None:
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("ReconnectPolicy: need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("ReconnectPolicy: multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("ReconnectPolicy: jitter must be between 0 and 1")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError("ReconnectPolicy: max_attempts must not be negative")
        if self.connect_timeout <= 0:
            raise ValueError("ReconnectPolicy: connect_timeout must be positive")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("ReconnectPolicy: idle_timeout must be positive (or None)")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the `attempt`-th consecutive attempt (1, 2, …)."""
        base = self.initial_backoff
        for _ in range(attempt - 1):
            base *= self.multiplier
            if base >= self.max_backoff:
                break
        base = min(base, self.max_backoff)
        return base * (1 - self.jitter * random.random())
