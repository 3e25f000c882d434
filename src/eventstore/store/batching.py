"""I/O-free rules of the append path: which queued requests form one batch, and what an
idempotent retry looks like. The writer (`eventstore.store.writer`) does the I/O."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Sized(Protocol):
    @property
    def event_count(self) -> int: ...
    @property
    def payload_bytes(self) -> int: ...
    @property
    def client_event_ids(self) -> list[str]: ...


_T = TypeVar("_T", bound=Sized)


def take_batch(queue: deque[_T], max_events: int, max_bytes: int) -> list[_T]:
    """Pop the longest prefix of `queue` that fits the limits (always at least one request).

    The batch also stops before a request that shares a client event id with a request already
    in it: the later one may be a retry of the earlier, and must see it committed to be
    recognised as one (it then goes in the next batch, so order is kept).
    """
    batch: list[_T] = []
    events = 0
    size = 0
    ids: set[str] = set()
    while queue:
        item = queue[0]
        if batch and (events + item.event_count > max_events
                      or size + item.payload_bytes > max_bytes):
            break
        client_ids = item.client_event_ids
        if client_ids and not ids.isdisjoint(client_ids):
            break
        ids.update(client_ids)
        events += item.event_count
        size += item.payload_bytes
        batch.append(queue.popleft())
    return batch


@dataclass(frozen=True)
class StoredEvent:
    """What the idempotency check needs of an already stored event."""

    event_id: str
    stream_id: str
    stream_type: str
    version: int
    position: int


@dataclass(frozen=True)
class Retry:
    """The request's events are all stored, in order: answer with the earlier result."""

    first_version: int
    first_position: int


@dataclass(frozen=True)
class Reused:
    """Some ids are stored, but not as this request's events: ALREADY_EXISTS."""

    message: str


def classify_stored(event_ids: Sequence[str], stream_id: str, stream_type: str,
                    stored: dict[str, StoredEvent]) -> Retry | Reused | None:
    """Decide from the stored events with this request's ids (content not yet compared).

    None: no id of the request is stored (a new append). `Retry`: every id is stored in this
    stream at consecutive versions and positions, in order — the caller must still compare
    types and payloads. `Reused`: anything else.
    """
    hits = [stored.get(event_id) for event_id in event_ids]
    found = [hit for hit in hits if hit is not None]
    if not found:
        return None
    if len(found) != len(hits):
        return Reused(
            f"event id {found[0].event_id} is already stored, but not every event of this "
            "request is: a retry must resend the original request unchanged"
        )
    first = found[0]
    for offset, hit in enumerate(found):
        if hit.stream_id != stream_id or hit.stream_type != stream_type:
            # Which stream is not said: the caller may not be allowed to read it.
            return Reused(f"event id {hit.event_id} is already stored in another stream")
        if hit.version != first.version + offset or hit.position != first.position + offset:
            return Reused(
                f"event id {hit.event_id} is already stored, but not in the order of this request"
            )
    return Retry(first.version, first.position)



class Guessable(Protocol):
    @property
    def stream_id(self) -> str: ...
    @property
    def stream_type(self) -> str: ...
    @property
    def expected_version(self) -> int | None: ...


def guess_versions(keys: dict[tuple[str, str], int], requests: Sequence[Guessable],
                   known: dict[tuple[str, str], int]) -> list[int] | None:
    """The current version of each of a batch's streams (`keys`: stream → its index), as the
    writer expects it to be without asking PostgreSQL, or None when it cannot tell.

    A stream's version is what the writer last saw (`known`) or, for a stream it has not seen,
    the expected version of the batch's first request on it, when that names one (0 or N):
    a client that states a version is usually right. "Any version" (absent) and "must exist"
    (-1) name none. A wrong guess costs one round trip (the guard refuses it), never a wrong
    answer.
    """
    guessed: list[int | None] = [None] * len(keys)
    for key, index in keys.items():
        guessed[index] = known.get(key)
    for request in requests:
        index = keys[(request.stream_id, request.stream_type)]
        if guessed[index] is None:
            expected = request.expected_version
            if expected is None or expected < 0:
                return None
            guessed[index] = expected
    if any(version is None for version in guessed):
        return None
    return [version for version in guessed if version is not None]
