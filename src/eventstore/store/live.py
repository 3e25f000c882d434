"""I/O-free parts of live delivery: the shared window of recent events, what a subscription
selects, and how notifications are framed.

One feed task per server reads each committed batch from PostgreSQL once and appends it to a
bounded `Window`; every subscriber that follows the head reads from that window instead of
querying the database. A subscriber that falls behind the window's start (slow, stalled, or
just subscribed from far back) catches up from the database by itself, so a slow reader costs
no memory beyond the window every subscriber shares, and writers never wait for readers.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from eventstore.store.validation import EventFilter


@dataclass(slots=True)
class LiveEvent:
    """A committed event with what filters need; `data` is the serialized `Event`, and
    `notification` the EventNotification that carries it alone (framed once, however many
    subscribers it goes to: by the Rust extension, which reads events from the database;
    here only when not given).

    Not frozen: a catch-up reads thousands a page, and a frozen dataclass sets each field
    through `object.__setattr__` (with the framing in Python, that was 85% of a catch-up
    storm's CPU). Treat it as immutable."""

    position: int
    version: int
    stream_id: str
    stream_type: str
    event_type: str
    data: bytes
    notification: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.notification:
            self.notification = _field(_EVENT, self.data)


@dataclass(frozen=True)
class Selector:
    """Which events a subscription delivers.

    `stream_id` (with exactly one stream type) narrows to one stream; `after_version` then
    skips that stream's events up to a version (SubscribeToStream's `from_version`).
    """

    filter: EventFilter = field(default_factory=EventFilter)
    stream_id: str | None = None
    after_version: int = 0

    def matches(self, event: LiveEvent) -> bool:
        if self.stream_id is not None:
            return (event.stream_id == self.stream_id
                    and event.stream_type == self.filter.stream_types[0]
                    and event.version > self.after_version)
        return self.filter.matches(event.stream_type, event.event_type)


class Window:
    """The most recent committed events, covering positions (start, end].

    Every event with a position in (start, end] is in the window (positions may have holes,
    so `start` is kept explicitly rather than taken from the first event). `extend` evicts from
    the front to stay within the limits; evicting raises `start`.

    Events live in a list with a moving head (`_first`), compacted now and then, so that
    reading from anywhere in a full window is a slice, not a walk (a deque's middle is O(n)).
    """

    def __init__(self, head: int, *, max_events: int, max_bytes: int) -> None:
        self.start = head
        self.end = head
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._events: list[LiveEvent] = []
        self._positions: list[int] = []
        self._first = 0
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._events) - self._first

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def covers(self, after: int) -> bool:
        """True when every event after `after`, up to `end`, is in the window."""
        return self.start <= after <= self.end

    def extend(self, events: list[LiveEvent], new_end: int) -> None:
        """Append `events` (ascending); the window now reaches `new_end`. Events at or below
        `end` are already in it (a read that raced the writer's hand-over of its own commits
        returns some again) and are skipped."""
        if new_end < self.end:
            raise ValueError("the window cannot move backwards")
        if events and events[0].position <= self.end:
            events = events[bisect.bisect_right([e.position for e in events], self.end):]
        for event in events:
            self._events.append(event)
            self._positions.append(event.position)
            self._bytes += len(event.data)
        self.end = new_end
        while len(self) and (len(self) > self._max_events or self._bytes > self._max_bytes):
            evicted = self._events[self._first]
            self._first += 1
            self._bytes -= len(evicted.data)
            self.start = evicted.position
        if not len(self):
            self.start = self.end
        if self._first > 1024 and self._first * 2 > len(self._events):
            del self._events[:self._first]
            del self._positions[:self._first]
            self._first = 0

    def skip_to(self, new_end: int) -> None:
        """Forget every event and cover nothing up to `new_end`: (new_end, new_end]."""
        if new_end < self.end:
            raise ValueError("the window cannot move backwards")
        self._events.clear()
        self._positions.clear()
        self._first = 0
        self._bytes = 0
        self.start = self.end = new_end

    def since(self, after: int, limit: int) -> tuple[list[LiveEvent], int]:
        """Up to `limit` events after `after` (which `covers`), and the position they reach:
        `end` when they are all of them, else the last one's position."""
        first = bisect.bisect_right(self._positions, after, lo=self._first)
        last = min(len(self._events), first + limit)
        events = self._events[first:last]
        if last < len(self._events):
            return events, events[-1].position if events else after
        return events, self.end


# -- framing: EventNotification is a oneof; fields are written by hand around ready bytes -----

_EVENT = 1  # EventNotification.event (also EventBatch.events)
_BATCH = 2
_CHECKPOINT = 3
_CAUGHT_UP = 4


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _position_message(position: int) -> bytes:
    # Checkpoint / CaughtUp: { int64 position = 1 } (omitted when 0, as proto3 does)
    return b"\x08" + _varint(position) if position else b""


def batch_notification(events: list[LiveEvent]) -> bytes:
    # EventBatch.events is field 1 too: each event's own notification is its batch entry.
    return _field(_BATCH, b"".join(e.notification for e in events))


def batch_body_notification(body: bytes) -> bytes:
    """A batch notification around an EventBatch body that is already serialized."""
    return _field(_BATCH, body)


def checkpoint_notification(position: int) -> bytes:
    return _field(_CHECKPOINT, _position_message(position))


def caught_up_notification(position: int) -> bytes:
    return _field(_CAUGHT_UP, _position_message(position))


def frame(events: list[LiveEvent], max_batch: int, max_bytes: int) -> list[bytes]:
    """The notifications that carry `events`: one per event when max_batch ≤ 1, else batches
    of at most `max_batch` events and about `max_bytes` bytes (at least one event each)."""
    if max_batch <= 1:
        return [e.notification for e in events]
    out: list[bytes] = []
    chunk: list[LiveEvent] = []
    size = 0
    for event in events:
        if chunk and (len(chunk) >= max_batch or size + len(event.data) > max_bytes):
            out.append(batch_notification(chunk))
            chunk, size = [], 0
        chunk.append(event)
        size += len(event.data) + 6
    if chunk:
        out.append(batch_notification(chunk))
    return out
