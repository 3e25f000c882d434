"""Live delivery: SubscribeToStream and SubscribeToAll (shared/API.md), through purerpc and grpcio.

What is checked, against the contract:
- the switch from history to live under concurrent writes: every acknowledged event exactly
  once, in ascending position, one `caught_up` that separates what history delivered from what
  came live, batches never larger than `max_batch_size`;
- two server processes on one database: commits made through one process reach subscribers of
  the other promptly (NOTIFY, not the poll);
- a subscriber that stops reading stalls neither writers nor other subscribers, the feed's
  window stays within its limit, and the subscriber catches up completely when it reads again;
- filters, SubscribeToStream (one stream / one type), include_existing, checkpoints and batching;
- bad requests are INVALID_ARGUMENT naming the field;
- cancelled subscriptions are released; a shutdown ends subscriptions with UNAVAILABLE;
- edge cases at the end of the file (one known limitation, as a strict xfail).

Every loop is bounded in count and runs under `trio.fail_after`; everything is on loopback.
"""

from __future__ import annotations

import itertools
import os
import random
import time

# Imported up front: pytest's unraisable-exception hook imports it lazily, and a garbage
# collection of purerpc's unclosed streams during that import fails the hook itself.
import tracemalloc  # noqa: F401
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import grpc
import orjson
import psycopg
import purerpc
import pytest
import trio
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration

from eventstore.config import Settings
from eventstore.server import ServerInfo, serve
from eventstore.store.subscriptions import HEARTBEAT_SECONDS, LISTENER_NAME, LiveFeed
from eventstore.v1 import eventstore_grpc
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import GrpcioClient, PurerpcClient
from tests.conftest import PgCluster, make_settings
from tests.helpers import read_all
from tests.processes import eventstore_process

CLIENTS = ("purerpc", "grpcio")
MAX_NOTIFICATIONS = 1_000_000
# The `server` fixture of this module: a small window and scan window, so that history is read
# from the database (catch-up, per event and in batches) and live events from the window.
WINDOW_EVENTS = 64


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, live_window_events=WINDOW_EVENTS,
                         read_all_scan_window=150)


# -- what a subscription received ----------------------------------------------------------


@dataclass
class Sub:
    """Everything one subscription received, in order."""

    name: str
    events: list[pb.Event] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() per event
    # (number of events received before it, position)
    caught_up: list[tuple[int, int]] = field(default_factory=list)
    # (time.monotonic(), number of events received before it, position)
    checkpoints: list[tuple[float, int, int]] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def add(self, note: pb.EventNotification) -> None:
        now = time.monotonic()
        kind = note.WhichOneof("kind")
        assert kind is not None, f"{self.name}: a notification with no kind"
        # Bounds every loop that reads notifications (they also run under fail_after).
        assert len(self.kinds) < MAX_NOTIFICATIONS, f"{self.name}: too many notifications"
        self.kinds.append(kind)
        if kind == "event":
            self.events.append(note.event)
            self.arrivals.append(now)
        elif kind == "batch":
            self.batch_sizes.append(len(note.batch.events))
            self.events.extend(note.batch.events)
            self.arrivals.extend([now] * len(note.batch.events))
        elif kind == "checkpoint":
            self.checkpoints.append((now, len(self.events), note.checkpoint.position))
        else:
            self.caught_up.append((len(self.events), note.caught_up.position))

    @property
    def positions(self) -> list[int]:
        return [e.position for e in self.events]

    def keys(self) -> list[tuple[int, str]]:
        return [(e.position, e.event_id) for e in self.events]


Done = Callable[[Sub], bool]


class Ended(Exception):
    """The subscription ended (with a status, or without one) before the test was done."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


async def drain_purerpc(notes: Any, sub: Sub, done: Done) -> Ended | None:
    """Feed `notes` (a purerpc response stream) into `sub` until `done(sub)`; how it ended
    if it ended first. (Returned, not raised: purerpc's channel would wrap it in a group.)"""
    try:
        async with aclosing(notes):
            if done(sub):
                return None
            async for note in notes:
                sub.add(note)
                if done(sub):
                    return None
    except purerpc.RpcFailedError as exc:
        return Ended(exc.status.status_code.name, exc.status.status_message)
    return Ended("ENDED", f"{sub.name}: the stream ended without an error status")


@asynccontextmanager
async def purerpc_channel(port: int, channel: Any = None) -> AsyncIterator[Any]:
    """A purerpc channel whose TCP connection is closed on the way out. (purerpc 0.8's channel
    leaves its socket open — even after gc.collect() — so the server could never notice that
    the client went away.)"""
    channel = channel or purerpc.insecure_channel("127.0.0.1", port)
    try:
        async with channel:
            yield channel
    finally:
        grpc_socket = getattr(channel, "_grpc_socket", None)
        sock = getattr(getattr(grpc_socket, "_socket", None), "_stream", None)
        if sock is not None:
            with trio.CancelScope(shield=True):
                await sock.aclose()


async def collect_purerpc(port: int, method: str, request: Any, sub: Sub, done: Done) -> Sub:
    async with purerpc_channel(port) as channel:
        stub = eventstore_grpc.EventStoreServiceStub(channel)
        ended = await drain_purerpc(getattr(stub, method)(request), sub, done)
    if ended is not None:
        raise ended
    return sub


async def collect_grpcio(port: int, method: str, request: Any, sub: Sub, done: Done) -> Sub:
    """The same through grpcio: the blocking iterator runs in a worker thread; the call is
    cancelled when done, on error and on trio cancellation (which abandons the thread)."""
    client = GrpcioClient(port)
    call = client.stream_sync(method, request)

    def pump() -> Ended | None:
        try:
            if done(sub):
                return None
            for note in call:
                sub.add(note)
                if done(sub):
                    return None
        except grpc.RpcError as exc:
            return Ended(exc.code().name, exc.details() or "")  # type: ignore[attr-defined]
        return Ended("ENDED", f"{sub.name}: the stream ended without an error status")

    try:
        ended = await trio.to_thread.run_sync(pump, abandon_on_cancel=True)
    finally:
        call.cancel()
        client.close()
    if ended is not None:
        raise ended
    return sub


async def collect(kind: str, port: int, method: str, request: Any, done: Done,
                  name: str = "") -> Sub:
    sub = Sub(name or f"{kind} {method}")
    if kind == "purerpc":
        return await collect_purerpc(port, method, request, sub, done)
    return await collect_grpcio(port, method, request, sub, done)


def has_events(n: int) -> Done:
    return lambda s: len(s.events) >= n


def is_caught_up(s: Sub) -> bool:
    return bool(s.caught_up)


async def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> float:
    """Poll `condition` (state that no event announces) until it holds; the seconds it took.
    Fails after `seconds`."""
    started = time.monotonic()
    for _ in range(int(seconds / 0.005) + 1):
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            break
        await trio.sleep(0.005)
    raise AssertionError(f"not within {seconds} s: {what}")


async def first_status(kind: str, port: int, method: str, request: Any) -> Ended:
    """The status a subscription ends with (it must end by itself, before any event)."""
    try:
        with trio.fail_after(10):
            await collect(kind, port, method, request, lambda s: False)
    except Ended as ended:
        return ended
    raise AssertionError("unreachable")


# -- checks ----------------------------------------------------------------------------------


def assert_ascending(sub: Sub) -> None:
    positions = sub.positions
    bad = [(a, b) for a, b in itertools.pairwise(positions) if a >= b]
    assert not bad, f"{sub.name}: positions not strictly ascending, e.g. {bad[:3]}"


def assert_caught_up_once(sub: Sub, *, history_head: int | None = None) -> int:
    """Exactly one caught_up; every event before it is at or below its position, every event
    after it above; its position covers everything committed before the call (`history_head`).
    Returns its position."""
    assert len(sub.caught_up) == 1, f"{sub.name}: caught_up {len(sub.caught_up)} times"
    index, position = sub.caught_up[0]
    before, after = sub.positions[:index], sub.positions[index:]
    assert all(p <= position for p in before), (
        f"{sub.name}: an event before caught_up({position}) is above it: {max(before)}")
    assert all(p > position for p in after), (
        f"{sub.name}: an event after caught_up({position}) is not above it: {min(after)}")
    if history_head is not None:
        assert position >= history_head, (
            f"{sub.name}: caught_up({position}) before everything committed before the call "
            f"(head {history_head}) was delivered")
    return position


def assert_batches(sub: Sub, max_batch_size: int) -> None:
    if max_batch_size <= 1:
        assert "batch" not in sub.kinds, f"{sub.name}: a batch although max_batch_size ≤ 1"
    else:
        assert all(1 <= n <= max_batch_size for n in sub.batch_sizes), (
            f"{sub.name}: batch sizes {sorted(set(sub.batch_sizes))[-3:]} over "
            f"max_batch_size {max_batch_size} (or empty)")


def assert_same_events(sub: Sub, expected: Sequence[pb.Event]) -> None:
    """Exactly `expected` (full Event messages), in that order: nothing missing, nothing twice,
    nothing extra."""
    got = sub.keys()
    want = [(e.position, e.event_id) for e in expected]
    if got != want:
        got_set, want_set = set(got), set(want)
        missing = sorted(want_set - got_set)
        extra = sorted(got_set - want_set)
        dupes = len(got) - len(got_set)
        raise AssertionError(
            f"{sub.name}: {len(got)} events, expected {len(want)}; missing {len(missing)} "
            f"(e.g. {missing[:3]}), unexpected {len(extra)} (e.g. {extra[:3]}), "
            f"{dupes} duplicates")
    for mine, theirs in zip(sub.events, expected, strict=True):
        assert mine == theirs, f"{sub.name}: event at {mine.position} differs from ReadAll"


# -- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    stream_id: str
    stream_type: str
    event_ids: tuple[str, ...]
    first_position: int
    last_position: int


@dataclass
class Acks:
    """Acknowledged appends, and the highest position acknowledged so far."""

    items: list[Ack] = field(default_factory=list)
    head: int = 0
    count: int = 0  # events

    def add(self, ack: Ack) -> None:
        self.items.append(ack)
        self.head = max(self.head, ack.last_position)
        self.count += len(ack.event_ids)

    def ids(self) -> set[str]:
        return {i for a in self.items for i in a.event_ids}


async def append(client: PurerpcClient, acks: Acks, stream_id: str, stream_type: str,
                 event_types: Sequence[str], tag: str = "") -> Ack:
    reply = await client.call("AppendEvents", pb.AppendEventsRequest(
        stream_id=stream_id, stream_type=stream_type,
        events=[pb.NewEvent(event_type=t, data=orjson.dumps({"tag": tag, "j": j}))
                for j, t in enumerate(event_types)]))
    ack = Ack(stream_id, stream_type, tuple(reply.event_ids), reply.first_position,
              reply.last_position)
    assert len(ack.event_ids) == len(event_types)
    acks.add(ack)
    return ack


async def write_load(port: int, writer_no: int, sizes: Sequence[int], acks: Acks, *,
                     stream_types: Sequence[str] = ("Account",),
                     event_types: Sequence[str] = ("Happened",)) -> None:
    """Append one batch per entry of `sizes` to a few streams of this writer's own."""
    rng = random.Random(writer_no)
    streams = [(str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                stream_types[(writer_no + k) % len(stream_types)]) for k in range(3)]
    async with PurerpcClient.connect(port) as client:
        for i, n in enumerate(sizes):
            stream_id, stream_type = rng.choice(streams)
            types = [rng.choice(event_types) for _ in range(n)]
            await append(client, acks, stream_id, stream_type, types, f"w{writer_no}a{i}")


async def everything(port: int, **filters: tuple[str, ...]) -> list[pb.Event]:
    """The store's content by ReadAll (the ground truth subscriptions are compared with)."""
    async with PurerpcClient.connect(port) as client:
        return await read_all(client, page=5000, **filters)


async def start_server(nursery: trio.Nursery, settings: Settings,
                       shutdown: trio.Event | None = None) -> ServerInfo:
    info: ServerInfo = await nursery.start(
        lambda task_status: serve(settings, shutdown=shutdown, task_status=task_status))
    assert isinstance(info.feed, LiveFeed), "ServerInfo.feed is not the live feed"
    return info


# =================================================================================================
# 5. Bad requests
# =================================================================================================

A_UUID = "6f1c9c1e-6f1a-4b8e-9a57-3d2a7c1b2e4f"

BAD_REQUESTS: list[tuple[str, str, Any, str]] = [
    ("no stream_type", "SubscribeToStream", pb.SubscribeRequest(), "stream_type"),
    ("stream_type too long", "SubscribeToStream",
     pb.SubscribeRequest(stream_type="x" * 256), "stream_type"),
    ("stream_id not a UUID", "SubscribeToStream",
     pb.SubscribeRequest(stream_type="Order", stream_id="not-a-uuid"), "stream_id"),
    ("from_position with stream_id", "SubscribeToStream",
     pb.SubscribeRequest(stream_type="Order", stream_id=A_UUID, from_position=5),
     "from_position"),
    ("from_version without stream_id", "SubscribeToStream",
     pb.SubscribeRequest(stream_type="Order", from_version=3), "from_version"),
    ("negative from_version", "SubscribeToStream",
     pb.SubscribeRequest(stream_type="Order", stream_id=A_UUID, from_version=-1),
     "from_version"),
    ("negative from_position (stream)", "SubscribeToStream",
     pb.SubscribeRequest(stream_type="Order", from_position=-1), "from_position"),
    ("negative max_batch_size (stream)", "SubscribeToStream",
     pb.SubscribeRequest(stream_type="Order", max_batch_size=-1), "max_batch_size"),
    ("negative checkpoint_interval_ms (stream)", "SubscribeToStream",
     pb.SubscribeRequest(stream_type="Order", checkpoint_interval_ms=-5),
     "checkpoint_interval_ms"),
    ("negative from_position", "SubscribeToAll",
     pb.SubscribeAllRequest(from_position=-1), "from_position"),
    ("negative max_batch_size", "SubscribeToAll",
     pb.SubscribeAllRequest(max_batch_size=-1), "max_batch_size"),
    ("negative checkpoint_interval_ms", "SubscribeToAll",
     pb.SubscribeAllRequest(checkpoint_interval_ms=-5), "checkpoint_interval_ms"),
    ("empty stream type in filter", "SubscribeToAll",
     pb.SubscribeAllRequest(filter=pb.Filter(stream_types=["Order", ""])), "stream_types"),
    ("empty prefix in filter", "SubscribeToAll",
     pb.SubscribeAllRequest(filter=pb.Filter(event_type_prefixes=[""])),
     "event_type_prefixes"),
]


@pytest.mark.parametrize("kind", CLIENTS)
async def test_bad_subscription_requests_are_invalid_argument(kind: str,
                                                              server: ServerInfo) -> None:
    with trio.fail_after(60):
        for label, method, request, field_name in BAD_REQUESTS:
            ended = await first_status(kind, server.port, method, request)
            assert ended.code == "INVALID_ARGUMENT", f"{label}: {ended}"
            assert field_name in ended.message, f"{label}: message does not name {field_name}"
            assert "Traceback" not in ended.message and "Error(" not in ended.message, (
                f"{label}: {ended.message}")
        # The server keeps serving, subscriptions included.
        sub = await collect(kind, server.port, "SubscribeToAll", pb.SubscribeAllRequest(),
                            is_caught_up)
        assert sub.kinds == ["caught_up"]
        sub = await collect(kind, server.port, "SubscribeToStream",
                            pb.SubscribeRequest(stream_type="Order", stream_id=A_UUID),
                            is_caught_up)
        assert sub.kinds == ["caught_up"]


# =================================================================================================
# 4. Filters, SubscribeToStream, include_existing, checkpoints, batching
# =================================================================================================

FILTER_STREAM_TYPES = ("Order", "Invoice", "Kunde·Größe")
FILTER_EVENT_TYPES = ("Order.Created", "Order.Shipped", "Invoice.Sent", "Odd_1", "OddX1",
                      "Pct%X", "PctAX", "Back\\slash", "BackXslash", "Other")
FILTERS: dict[str, pb.Filter] = {
    "stream type": pb.Filter(stream_types=["Order"]),
    "prefix": pb.Filter(event_type_prefixes=["Order."]),
    "both": pb.Filter(stream_types=["Invoice", "Kunde·Größe"],
                      event_type_prefixes=["Order.S", "Invoice"]),
    # LIKE's wildcards and escape character are plain characters in a prefix.
    "wildcards": pb.Filter(event_type_prefixes=["Odd_", "Pct%", "Back\\"]),
    "nothing matches": pb.Filter(stream_types=["NoSuchType"]),
}


def matches(event: pb.Event, f: pb.Filter) -> bool:
    if f.stream_types and event.stream_type not in f.stream_types:
        return False
    return not f.event_type_prefixes or event.event_type.startswith(
        tuple(f.event_type_prefixes))


async def write_mixture(client: PurerpcClient, acks: Acks, rng: random.Random, appends: int,
                        streams: Sequence[tuple[str, str]]) -> None:
    for i in range(appends):
        stream_id, stream_type = rng.choice(streams)
        types = [rng.choice(FILTER_EVENT_TYPES) for _ in range(rng.randint(1, 8))]
        await append(client, acks, stream_id, stream_type, types, f"m{i}")


@pytest.mark.parametrize("kind", CLIENTS)
async def test_filters_over_history_and_live(kind: str, server: ServerInfo) -> None:
    """Each filter delivers exactly the matching events, from history (the database) and live
    (the window) alike; checkpoints of a filter that hides everything still advance."""
    rng = random.Random(4)
    streams = [(str(uuid.uuid4()), t) for t in FILTER_STREAM_TYPES for _ in range(2)]
    acks = Acks()
    targets: dict[str, int | None] = dict.fromkeys(FILTERS)
    subs: dict[tuple[str, int], Sub] = {}

    async def subscriber(name: str, max_batch: int, history_head: int) -> None:
        request = pb.SubscribeAllRequest(include_existing=True, filter=FILTERS[name],
                                         checkpoint_interval_ms=100, max_batch_size=max_batch)

        def done(s: Sub) -> bool:
            target = targets[name]
            if target is None or len(s.events) < target:
                return False
            # The hiding filter is done when a checkpoint has passed every hidden event.
            return target > 0 or any(p >= acks.head for _, _, p in s.checkpoints)

        sub = await collect(kind, server.port, "SubscribeToAll", request, done,
                            f"{name}, max_batch_size={max_batch}")
        subs[name, max_batch] = sub
        assert_caught_up_once(sub, history_head=history_head)
        assert_batches(sub, max_batch)

    with trio.fail_after(40):
        async with PurerpcClient.connect(server.port) as client:
            await write_mixture(client, acks, rng, 60, streams)
            async with trio.open_nursery() as nursery:
                for name in FILTERS:
                    for max_batch in (0, 4):
                        nursery.start_soon(subscriber, name, max_batch, acks.head)
                await write_mixture(client, acks, rng, 60, streams)
                stored = await everything(server.port)
                assert {e.event_id for e in stored} == acks.ids()
                for name, f in FILTERS.items():
                    targets[name] = sum(1 for e in stored if matches(e, f))
    for (name, _), sub in subs.items():
        f = FILTERS[name]
        assert_same_events(sub, [e for e in stored if matches(e, f)])
        checkpoints = [p for _, _, p in sub.checkpoints]
        assert checkpoints == sorted(checkpoints), f"{sub.name}: checkpoints went back"
    assert targets["nothing matches"] == 0 and targets["wildcards"]
    for max_batch in (0, 4):
        hidden = subs["nothing matches", max_batch]
        assert not hidden.events and hidden.checkpoints[-1][2] >= stored[-1].position


async def test_a_large_small_batch_is_written_and_handed_to_subscribers(
        server: ServerInfo) -> None:
    """While someone subscribes, a batch of up to 64 events and 256 KiB is inserted and read
    back in the COMMIT's own call: the largest batch that takes that path, end to end. (Its
    query text is about as large as a loopback socket takes at once; tests/test_libpq.py
    checks, with a small socket buffer, that a query is sent whole before the writer waits
    for its answer.)"""
    acks = Acks()
    stream_id = str(uuid.uuid4())
    blob = "x" * 3900
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            result: list[Sub] = []

            async def run() -> None:
                result.append(await collect(
                    "purerpc", server.port, "SubscribeToAll",
                    pb.SubscribeAllRequest(filter=pb.Filter(stream_types=["Bulky"])),
                    has_events(64), "bulky"))

            nursery.start_soon(run)
            for _ in range(2000):
                if server.feed.subscribers:  # type: ignore[attr-defined]
                    break
                await trio.sleep(0.01)
            async with PurerpcClient.connect(server.port) as client:
                reply = await client.call("AppendEvents", pb.AppendEventsRequest(
                    stream_id=stream_id, stream_type="Bulky",
                    events=[pb.NewEvent(event_type="Big", data=orjson.dumps({"i": i, "s": blob}))
                            for i in range(64)]))
                acks.add(Ack(stream_id, "Bulky", tuple(reply.event_ids), reply.first_position,
                             reply.last_position))
    sub, = result
    assert [e.version for e in sub.events] == list(range(1, 65))
    assert [e.event_id for e in sub.events] == list(acks.items[0].event_ids)


async def test_catch_up_reading_ahead_with_uneven_pages(nursery: trio.Nursery,
                                                        database_url: str) -> None:
    """A catch-up from the database reads its next pages while sending one, guessing where the
    page after next starts. Filters and a small scan window make pages span uneven position
    ranges, so guesses go wrong; every filter and batch size still gets exactly its events."""
    info = await start_server(nursery, make_settings(database_url, live_window_events=5,
                                                     read_all_scan_window=37))
    rng = random.Random(7)
    streams = [(str(uuid.uuid4()), t) for t in FILTER_STREAM_TYPES for _ in range(2)]
    acks = Acks()
    with trio.fail_after(60):
        async with PurerpcClient.connect(info.port) as client:
            await write_mixture(client, acks, rng, 120, streams)
            await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Created"] * 200)
        stored = await everything(info.port)
        assert info.feed.window is not None and info.feed.window.start > 0
        for name in ("stream type", "both", "nothing matches", None):
            f = FILTERS[name] if name is not None else pb.Filter()
            expected = [e for e in stored if matches(e, f)]
            for max_batch in (2, 9, 1000):
                sub = await collect("purerpc", info.port, "SubscribeToAll",
                                    pb.SubscribeAllRequest(include_existing=True, filter=f,
                                                           max_batch_size=max_batch),
                                    is_caught_up, f"{name}, max_batch_size={max_batch}")
                assert_same_events(sub, expected)
                assert_batches(sub, max_batch)
                assert_caught_up_once(sub, history_head=stored[-1].position)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_subscribe_to_one_stream_from_version(kind: str, server: ServerInfo) -> None:
    """stream_id + from_version (exclusive): that stream's later versions only — not another
    stream of the same type, not the same id under another type — history, then live."""
    stream_id = str(uuid.uuid4())
    acks = Acks()
    with trio.fail_after(30):
        async with PurerpcClient.connect(server.port) as client:
            await append(client, acks, stream_id, "Order", ["Order.Created"] * 10)
            await append(client, acks, stream_id, "Invoice", ["Invoice.Sent"] * 5)
            await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Created"] * 5)
            await append(client, acks, stream_id, "Order", ["Order.Shipped"] * 2)  # v11, v12
            request = pb.SubscribeRequest(stream_type="Order", stream_id=stream_id.upper(),
                                          from_version=4, include_existing=True,
                                          max_batch_size=3)
            async with trio.open_nursery() as nursery:
                result: list[Sub] = []

                async def run() -> None:
                    result.append(await collect(kind, server.port, "SubscribeToStream",
                                                request, has_events(8 + 3), "one stream"))

                nursery.start_soon(run)
                await trio.sleep(0.3)
                await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Created"] * 3)
                await append(client, acks, stream_id, "Invoice", ["Invoice.Sent"] * 3)
                await append(client, acks, stream_id, "Order", ["Order.Shipped"] * 3)
            truth = await everything(server.port)
    sub, = result
    assert [e.version for e in sub.events] == list(range(5, 16))
    assert all(e.stream_id == stream_id and e.stream_type == "Order" for e in sub.events)
    assert_same_events(sub, [e for e in truth if e.stream_id == stream_id
                             and e.stream_type == "Order" and e.version > 4])
    assert_batches(sub, 3)
    assert_caught_up_once(sub)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_subscribe_to_stream_type_from_position(kind: str, server: ServerInfo) -> None:
    """stream_type without stream_id: every stream of that type, after from_position."""
    acks = Acks()
    rng = random.Random(7)
    streams = [(str(uuid.uuid4()), t) for t in ("Order", "Invoice") for _ in range(3)]
    with trio.fail_after(30):
        async with PurerpcClient.connect(server.port) as client:
            await write_mixture(client, acks, rng, 30, streams)
            middle = sorted(a.last_position for a in acks.items)[15]
            history_head = acks.head
            target: list[int] = []
            result: list[Sub] = []

            async def run() -> None:
                result.append(await collect(
                    kind, server.port, "SubscribeToStream",
                    pb.SubscribeRequest(stream_type="Order", from_position=middle,
                                        include_existing=True),
                    lambda s: bool(target) and len(s.events) >= target[0], "by type"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await write_mixture(client, acks, rng, 30, streams)
                truth = await everything(server.port)
                expected = [e for e in truth if e.stream_type == "Order" and e.position > middle]
                target.append(len(expected))
    sub, = result
    assert_same_events(sub, expected)
    assert_caught_up_once(sub, history_head=history_head)
    assert_batches(sub, 0)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_include_existing_false_starts_with_caught_up(kind: str,
                                                            server: ServerInfo) -> None:
    acks = Acks()
    stream_id = str(uuid.uuid4())
    with trio.fail_after(30):
        async with PurerpcClient.connect(server.port) as client:
            await append(client, acks, stream_id, "Order", ["Order.Created"] * 20)
            history = acks.head
            for method, request in (
                ("SubscribeToAll", pb.SubscribeAllRequest(include_existing=False,
                                                          from_position=3)),
                ("SubscribeToStream", pb.SubscribeRequest(stream_type="Order",
                                                          include_existing=False)),
                ("SubscribeToStream", pb.SubscribeRequest(stream_type="Order",
                                                          stream_id=stream_id,
                                                          include_existing=False)),
            ):
                result: list[Sub] = []
                async with trio.open_nursery() as nursery:
                    async def run(method: str = method, request: Any = request,
                                  result: list[Sub] = result) -> None:
                        result.append(await collect(kind, server.port, method, request,
                                                    has_events(5), method))

                    nursery.start_soon(run)
                    await trio.sleep(0.3)
                    new = await append(client, acks, stream_id, "Order", ["Order.Shipped"] * 5)
                sub, = result
                assert sub.kinds[0] == "caught_up", f"{method}: first message {sub.kinds[0]}"
                assert sub.caught_up == [(0, history)], method
                assert [e.event_id for e in sub.events] == list(new.event_ids), method
                history = acks.head


async def test_checkpoints_on_an_idle_store(server: ServerInfo) -> None:
    """checkpoint_interval_ms=200 on an idle store: a checkpoint about every 200 ms, at the
    head; resuming from one loses nothing."""
    acks = Acks()
    with trio.fail_after(30):
        async with PurerpcClient.connect(server.port) as client:
            await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Created"] * 7)
            request = pb.SubscribeAllRequest(include_existing=True, checkpoint_interval_ms=200)
            started = time.monotonic()
            sub = await collect("purerpc", server.port, "SubscribeToAll", request,
                                lambda s: time.monotonic() - started >= 1.5, "idle")
            assert len(sub.events) == 7
            assert_caught_up_once(sub, history_head=acks.head)
            times = [t for t, _, _ in sub.checkpoints]
            assert len(times) >= 5, f"{len(times)} checkpoints in 1.5 s at 200 ms"
            gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
            assert max(gaps) < 0.6, f"checkpoint gaps {gaps}"
            assert {p for _, _, p in sub.checkpoints} == {acks.head}
            resume_from = sub.checkpoints[-1][2]
            new = await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Shipped"] * 3)
            resumed = await collect("purerpc", server.port, "SubscribeToAll",
                                    pb.SubscribeAllRequest(include_existing=True,
                                                           from_position=resume_from),
                                    is_caught_up, "resumed")
            assert [e.event_id for e in resumed.events] == list(new.event_ids)


async def test_checkpoints_during_a_filtered_load_lose_nothing(
        nursery: trio.Nursery, database_url: str) -> None:
    """Under a write load, each checkpoint's position is one up to which every matching event
    has been delivered (also while catching up through a small scan window), and a new
    subscription from any checkpoint gets exactly the matching events after it."""
    info = await start_server(nursery, make_settings(database_url, live_window_events=300,
                                                     read_all_scan_window=200))
    f = pb.Filter(stream_types=["Invoice"], event_type_prefixes=["Invoice."])
    acks = Acks()
    target: list[int] = []
    rng = random.Random(11)
    streams = [(str(uuid.uuid4()), t) for t in FILTER_STREAM_TYPES for _ in range(3)]
    with trio.fail_after(40):
        async with PurerpcClient.connect(info.port) as client:
            await write_mixture(client, acks, rng, 400, streams)
            result: list[Sub] = []

            async def run() -> None:
                result.append(await collect(
                    "purerpc", info.port, "SubscribeToAll",
                    pb.SubscribeAllRequest(include_existing=True, filter=f,
                                           checkpoint_interval_ms=20),
                    lambda s: bool(target) and len(s.events) >= target[0]
                    and any(p >= acks.head for _, _, p in s.checkpoints), "filtered"))

            async with trio.open_nursery() as inner:
                inner.start_soon(run)
                await write_mixture(client, acks, rng, 300, streams)
                truth = await everything(info.port)
                expected = [e for e in truth if matches(e, f)]
                target.append(len(expected))
        sub, = result
        assert_same_events(sub, expected)
        assert len(sub.checkpoints) >= 3, "too few checkpoints to check"
        for _, before, position in sub.checkpoints:
            owed = [e.position for e in expected if e.position <= position]
            assert sub.positions[:before] == owed, (
                f"checkpoint {position}: not every matching event up to it was delivered")
        for _, _, position in rng.sample(sub.checkpoints, 3):
            resumed = await collect("purerpc", info.port, "SubscribeToAll",
                                    pb.SubscribeAllRequest(include_existing=True, filter=f,
                                                           from_position=position),
                                    is_caught_up, f"resumed from {position}")
            assert_same_events(resumed, [e for e in expected if e.position > position])


@pytest.mark.parametrize("kind", CLIENTS)
async def test_batches_never_exceed_max_batch_size(kind: str, server: ServerInfo) -> None:
    acks = Acks()
    with trio.fail_after(30):
        async with PurerpcClient.connect(server.port) as client:
            for _ in range(4):
                await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Created"] * 75)
        truth = await everything(server.port)
        for max_batch_size in (0, 1, 2, 50, 1_000_000):
            sub = await collect(kind, server.port, "SubscribeToAll",
                                pb.SubscribeAllRequest(include_existing=True,
                                                       max_batch_size=max_batch_size),
                                is_caught_up, f"max_batch_size={max_batch_size}")
            assert_same_events(sub, truth)
            assert_batches(sub, max_batch_size)
            if max_batch_size == 50:
                assert len(sub.batch_sizes) >= 6, sub.batch_sizes  # 300 events


# =================================================================================================
# 1. The switch from history to live under concurrent writes
# =================================================================================================


@pytest.mark.slow
async def test_history_to_live_switch_under_concurrent_writes(nursery: trio.Nursery,
                                                              database_url: str) -> None:
    """Subscribers from position 0 join at random moments of a write load (a small window, so
    some catch up from the database while the window moves on); each ends with the store's
    exact sequence, one caught_up between history and live, batches within max_batch_size."""
    info = await start_server(nursery, make_settings(database_url, live_window_events=300))
    rng = random.Random(1)
    writers, appends = 4, 50
    plans = [[rng.randint(1, 25) for _ in range(appends)] for _ in range(writers)]
    acks = Acks()
    await write_load(info.port, 99, [50] * 30, acks, stream_types=("History",))
    history_appends = len(acks.items)
    total = acks.count + sum(map(sum, plans))
    configs = [("purerpc", b) for b in (0, 1, 0, 3, 50, 1000, 0, 7)] + [
        ("grpcio", b) for b in (0, 1, 64, 5)]
    results: dict[int, tuple[Sub, int, int]] = {}

    async def subscriber(no: int, kind: str, max_batch: int, start_after: int) -> None:
        for _ in range(100_000):
            if len(acks.items) - history_appends >= start_after:
                break
            await trio.sleep(0.002)
        head = acks.head  # committed before the call: history must deliver it
        request = pb.SubscribeAllRequest(from_position=0, include_existing=True,
                                         max_batch_size=max_batch)
        # caught_up may also come after the last event (then it closes a catch-up that ran
        # until the writers stopped).
        sub = await collect(kind, info.port, "SubscribeToAll", request,
                            lambda s: len(s.events) >= total and bool(s.caught_up),
                            f"#{no} {kind} max_batch_size={max_batch} from ack {start_after}")
        results[no] = (sub, head, max_batch)

    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            for no, (kind, max_batch) in enumerate(configs):
                inner.start_soon(subscriber, no, kind, max_batch,
                                 rng.randrange(writers * appends - 1))
            for w, plan in enumerate(plans):
                inner.start_soon(partial_write_load, info.port, w, plan, acks)
        truth = await everything(info.port)
    assert len(truth) == total and {e.event_id for e in truth} == acks.ids()
    live = []
    for no in range(len(configs)):
        sub, head, max_batch = results[no]
        assert_same_events(sub, truth)
        index = len(sub.events) if not sub.caught_up else sub.caught_up[0][0]
        assert_caught_up_once(sub, history_head=head)
        assert_batches(sub, max_batch)
        live.append(len(sub.events) - index)
    print("events after caught_up per subscriber:", live)
    assert any(live), "no subscriber switched to live during the load: the test tested nothing"


async def partial_write_load(port: int, writer_no: int, sizes: Sequence[int], acks: Acks) -> None:
    await write_load(port, writer_no, sizes, acks,
                     stream_types=("Account", "Bestellung·Größe", "ВокабулярныйЭлемент"),
                     event_types=("Opened", "Deposited", "Withdrawn"))


# =================================================================================================
# 3. A subscriber that stops reading
# =================================================================================================


class SmallWindowChannel(purerpc.client._Channel):  # type: ignore[misc]
    """A purerpc channel whose streams advertise a small HTTP/2 receive window (purerpc's
    default is 64 MiB per stream, so a stalled purerpc reader would otherwise let the server
    send 64 MiB before its sends block). purerpc grants window only as messages are consumed."""

    def __init__(self, host: str, port: int, window_bytes: int) -> None:
        super().__init__(host, port)
        self._max_message = window_bytes // 2  # purerpc's window is 2 × max_message_length

    async def __aenter__(self) -> SmallWindowChannel:
        socket = await anyio.connect_tcp(self._host, self._port)
        config = GRPCConfiguration(client_side=True, max_message_length=self._max_message)
        self._grpc_socket = await self.enter_async_context(GRPCProtoSocket(config, socket))
        return self


async def open_raw_subscription(channel: Any, method: str, request: Any) -> Any:
    """A purerpc response stream we read message by message (and can inspect)."""
    client = purerpc.Client("eventstore.v1.EventStoreService", channel)
    request_type = pb.SubscribeAllRequest if method == "SubscribeToAll" else pb.SubscribeRequest
    stream = await client.rpc(method, request_type, pb.EventNotification)
    await stream.send_message(request)
    await stream.close()
    return stream


async def read_raw(stream: Any, sub: Sub, done: Done) -> None:
    for _ in range(10_000_000):
        if done(sub):
            return
        note = await stream.receive_message()
        if note is None:
            status = getattr(stream.end_stream_event, "status", None)
            if status is not None and status.int_value != 0:
                raise Ended(status.status_code.name, status.status_message)
            raise Ended("ENDED", f"{sub.name}: {stream.end_stream_event}")
        sub.add(note)


def buffered_messages(stream: Any) -> int | None:
    """How many received messages purerpc holds unread for `stream` (None: cannot tell)."""
    try:
        return int(stream._incoming_events[1].statistics().current_buffer_used)
    except (AttributeError, IndexError, TypeError):
        return None


async def follower_lag(sub: Sub, position: int) -> float:
    """Seconds until `sub` has received the event at `position` (at most 15)."""
    return await wait_until(lambda: bool(sub.events) and sub.events[-1].position >= position,
                            15, f"{sub.name} reaches position {position}")


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
async def test_a_stalled_subscriber_stalls_nothing(nursery: trio.Nursery,
                                                   database_url: str) -> None:
    """A subscriber that stops reading (its HTTP/2 window fills, the server's sends block)
    during 22,000 appended events: writers keep their throughput, a reading subscriber keeps
    up, the feed's window stays within live_window_events, memory stays flat; when it reads
    again it gets everything since it subscribed, once, in order."""
    window_events = 2000
    info = await start_server(nursery, make_settings(database_url,
                                                     live_window_events=window_events))
    feed = info.feed
    assert feed is not None and feed.window is not None
    writers, batch = 4, 50
    phase_a = [[batch] * 60 for _ in range(writers)]   # 12,000 events, nobody stalled
    phase_b = [[batch] * 110 for _ in range(writers)]  # 22,000 events, one subscriber stalled
    acks = Acks()
    samples: list[tuple[int, int, int]] = []  # (window events, window bytes, RSS)
    follower = Sub("follower")
    stalled = Sub("stalled")
    follower_target: list[int] = []

    async def sample(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            for _ in range(100_000):
                window = feed.window
                assert window is not None
                samples.append((len(window), window.size_bytes, rss_bytes()))
                await trio.sleep(0.02)

    async def write_phase(plans: list[list[int]], offset: int) -> float:
        """Run the writers; their throughput in events/s."""
        before = acks.count
        started = time.monotonic()
        async with trio.open_nursery() as writing:
            for w, plan in enumerate(plans):
                writing.start_soon(write_load, info.port, offset + w, plan, acks)
        return (acks.count - before) / (time.monotonic() - started)

    async def follow(task_status: trio.TaskStatus[None]) -> None:
        async with purerpc_channel(info.port) as channel:
            stream = await open_raw_subscription(
                channel, "SubscribeToAll", pb.SubscribeAllRequest(include_existing=False))
            await read_raw(stream, follower, is_caught_up)
            task_status.started()
            await read_raw(stream, follower, lambda s: bool(follower_target)
                           and len(s.events) >= follower_target[0])

    with trio.fail_after(75):
        async with trio.open_nursery() as inner:
            sampling = await inner.start(sample)
            await inner.start(follow)
            rate_a = await write_phase(phase_a, 0)
            lag_a = await follower_lag(follower, acks.head)

            stall_from = acks.head
            async with purerpc_channel(
                    0, SmallWindowChannel("127.0.0.1", info.port, 64 * 1024)) as channel:
                stream = await open_raw_subscription(
                    channel, "SubscribeToAll",
                    pb.SubscribeAllRequest(include_existing=True, from_position=stall_from))
                rss_before = rss_bytes()
                first_b_sample = len(samples)
                rates: list[float] = []
                phase_b_done = trio.Event()

                async def run_phase_b() -> None:
                    rates.append(await write_phase(phase_b, 100))
                    phase_b_done.set()

                inner.start_soon(run_phase_b)
                # Read a little, then stop reading while the writers go on.
                await read_raw(stream, stalled, has_events(100))
                await phase_b_done.wait()
                rate_b, = rates
                # The reading subscriber is not held up by the stalled one.
                lag_b = await follower_lag(follower, acks.head)
                b_samples = samples[first_b_sample:]
                held = buffered_messages(stream)
                window_start = feed.window.start
                truth = await everything(info.port)
                owed = [e for e in truth if e.position > stall_from]
                # Resume reading.
                with trio.fail_after(30):
                    await read_raw(stream, stalled, has_events(len(owed)))
            follower_target.append(sum(1 for e in truth
                                       if e.position > follower.caught_up[0][1]))
            sampling.cancel()

    max_window = max(s[0] for s in samples)
    rss_growth = max(s[2] for s in b_samples) - rss_before
    stalled_at = stalled.events[99].position
    print(f"writers: {rate_a:.0f} events/s without, {rate_b:.0f} events/s with a stalled "
          f"subscriber; follower {lag_a:.2f} s / {lag_b:.2f} s behind the writers; window max "
          f"{max_window} events / {max(s[1] for s in samples)} bytes; RSS "
          f"+{rss_growth >> 20} MiB; {held} messages held unread by the stalled client; "
          f"window start {window_start}, stalled subscriber read up to {stalled_at}")
    assert rate_b >= 0.5 * rate_a, f"writers slowed from {rate_a:.0f} to {rate_b:.0f} events/s"
    # (In one process with the writers, a Python reader lags a little behind 4 writers.)
    assert lag_b <= max(5.0, 2 * lag_a), (
        f"the reading subscriber lagged {lag_b:.1f} s (without a stalled one: {lag_a:.1f} s)")
    assert max_window <= window_events, f"the feed's window held {max_window} events"
    assert max(s[1] for s in samples) <= feed.window._max_bytes
    assert rss_growth < 200 * 2**20, f"memory grew by {rss_growth >> 20} MiB during the stall"
    if held is not None:  # the server's sends really were blocked by flow control
        assert held < 1000, f"the server sent {held} messages past a 64 KiB window"
    assert window_start > stalled_at + len(feed.window), (
        "the window did not move past the stalled subscriber: the stall tested nothing")
    assert_same_events(stalled, owed)
    assert_caught_up_once(stalled, history_head=stall_from)
    assert_same_events(follower, [e for e in truth if e.position > follower.caught_up[0][1]])


# =================================================================================================
# 2. Two server processes on one database
# =================================================================================================


@pytest.mark.slow
async def test_two_server_processes_deliver_each_others_commits(pg_cluster: PgCluster) -> None:
    """Writes through one process, subscribers on the other: nothing missing, in order, and
    prompt. LIVE_POLL_MS=60000 on both, so only the commit NOTIFY can wake the other feed."""
    url = pg_cluster.fresh_database()
    env = {"LIVE_POLL_MS": "60000", "LIVE_WINDOW_EVENTS": "500"}
    rng = random.Random(2)
    acks = Acks()
    with trio.fail_after(80):
        async with eventstore_process(url, env) as one, eventstore_process(url, env) as two:
            # Promptness: single appends through `one`, each awaited on `two`.
            latencies: list[float] = []
            prompt = Sub("prompt")
            async with purerpc_channel(two.port) as channel, \
                    PurerpcClient.connect(one.port) as client:
                stream = await open_raw_subscription(
                    channel, "SubscribeToAll", pb.SubscribeAllRequest(include_existing=False))
                with trio.fail_after(10):
                    await read_raw(stream, prompt, is_caught_up)
                for i in range(5):
                    await trio.sleep(rng.uniform(0.1, 0.6))  # both feeds idle again
                    sent = time.monotonic()
                    await append(client, acks, str(uuid.uuid4()), "Ping", ["Pinged"], f"p{i}")
                    with trio.fail_after(10):
                        await read_raw(stream, prompt, has_events(i + 1))
                    latencies.append(prompt.arrivals[-1] - sent)
            print("append on one → event on two:", [f"{x * 1000:.0f} ms" for x in latencies])
            assert max(latencies) < 5, f"delivery across processes took {latencies}"

            # Under load: writers on both processes (each feed then mixes its own writer's
            # hand-overs with reads of the other's commits); subscribers join on `two` (and
            # one on `one`) at random moments.
            writers, appends = 4, 40
            plans = [[rng.randint(1, 20) for _ in range(appends)] for _ in range(writers)]
            base = len(acks.items)
            total = acks.count + sum(map(sum, plans))
            results: dict[str, tuple[Sub, int]] = {}

            async def subscriber(name: str, kind: str, port: int, start_after: int) -> None:
                for _ in range(100_000):
                    if len(acks.items) - base >= start_after:
                        break
                    await trio.sleep(0.002)
                head = acks.head
                sub = await collect(kind, port, "SubscribeToAll",
                                    pb.SubscribeAllRequest(include_existing=True,
                                                           max_batch_size=rng.choice((0, 20))),
                                    lambda s: len(s.events) >= total and bool(s.caught_up),
                                    name)
                results[name] = (sub, head)

            async with trio.open_nursery() as inner:
                for no, kind in enumerate(("purerpc", "purerpc", "purerpc", "grpcio", "grpcio")):
                    inner.start_soon(subscriber, f"#{no} {kind} on two", kind, two.port,
                                     rng.randrange(writers * appends - 1))
                inner.start_soon(subscriber, "purerpc on one", "purerpc", one.port,
                                 rng.randrange(writers * appends - 1))
                for w, plan in enumerate(plans):
                    inner.start_soon(partial_write_load, (one.port, two.port)[w % 2], w, plan,
                                     acks)
            truth = await everything(two.port)
    assert len(truth) == total and {e.event_id for e in truth} == acks.ids()
    for sub, head in results.values():
        assert_same_events(sub, truth)
        assert_caught_up_once(sub, history_head=head)
    for proc in (one, two):
        tail = "\n".join(proc.stderr[-20:])
        assert proc.returncode == 0, f"serve exited with {proc.returncode} on SIGTERM:\n{tail}"
        assert not any("Traceback" in line for line in proc.stderr), tail


async def test_the_commit_listener_reconnects(nursery: trio.Nursery, database_url: str) -> None:
    """The LISTEN connection is terminated: the listener connects again by itself, and a
    commit by another process (its NOTIFY the only wake-up: LIVE_POLL_MS is a minute) still
    reaches subscribers promptly."""
    info = await start_server(nursery, make_settings(database_url, live_poll_ms=60_000))
    prompt = Sub("prompt")

    def listener_pids() -> list[int]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname ="
                                " current_database() AND application_name = %s",
                                (LISTENER_NAME,))
            return [int(pid) for pid, in rows]

    with trio.fail_after(40):
        async with purerpc_channel(info.port) as channel:
            stream = await open_raw_subscription(
                channel, "SubscribeToAll", pb.SubscribeAllRequest(include_existing=False))
            await read_raw(stream, prompt, is_caught_up)
            (old,) = listener_pids()
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (old,))
            pids: list[int] = []
            for _ in range(300):  # the listener waits a second before reconnecting
                pids = [pid for pid in listener_pids() if pid != old]
                if pids:
                    break
                await trio.sleep(0.05)
            assert pids, "the listener did not reconnect"
            # Another process's commit, as its writer would make it.
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO events (event_id, stream_id, stream_type, version, event_type,"
                    " data, position, created_at) VALUES (gen_random_uuid(), gen_random_uuid(),"
                    " 'Elsewhere', 1, 'Happened', '{}', 1, now()); NOTIFY eventstore_commits")
            sent = time.monotonic()
            with trio.fail_after(10):
                await read_raw(stream, prompt, has_events(1))
            assert time.monotonic() - sent < 5
            assert prompt.events[0].stream_type == "Elsewhere"


async def test_commits_are_announced_only_while_another_server_listens(
        nursery: trio.Nursery, database_url: str) -> None:
    """Alone, a server does not NOTIFY its commits (each would only wake its own listener).
    A listener that announces itself (as another server process's does when it connects) is
    answered at once, and from then on the server's commits are announced."""
    info = await start_server(nursery, make_settings(database_url))
    acks = Acks()
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("LISTEN eventstore_commits")

        async def heard(wanted: Callable[[str], bool], seconds: float) -> list[tuple[int, str]]:
            got: list[tuple[int, str]] = []
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline and not any(wanted(p) for _, p in got):
                other.pgconn.consume_input()
                while (notify := other.pgconn.notifies()) is not None:
                    got.append((notify.be_pid, notify.extra.decode()))
                await trio.sleep(0.01)
            return got

        with trio.fail_after(30):
            async with PurerpcClient.connect(info.port) as client:
                await append(client, acks, str(uuid.uuid4()), "Alone", ["Happened"])
                commits = [n for n in await heard(lambda p: p == "", 1.0) if n[1] == ""]
                assert commits == [], "a server alone announced its commit"
                other.execute("NOTIFY eventstore_commits, 'hello'")
                answers = await heard(lambda p: p == "here", 10.0)
                assert any(payload == "here" for _, payload in answers), answers
                await append(client, acks, str(uuid.uuid4()), "Shared", ["Happened"])
                commits = [n for n in await heard(lambda p: p == "", 10.0) if n[1] == ""]
                assert len(commits) == 1, "the commit was not announced to the other listener"


# =================================================================================================
# 6. Cancelled subscriptions are released
# =================================================================================================


async def wait_for_subscribers(feed: LiveFeed, count: int, seconds: float) -> float:
    """Seconds until feed.subscribers == count; fails after `seconds`."""
    try:
        return await wait_until(lambda: feed.subscribers == count, seconds,
                                f"{count} subscriptions open")
    except AssertionError:
        raise AssertionError(f"{feed.subscribers} subscriptions open after {seconds} s, "
                             f"expected {count}") from None


@pytest.mark.slow
async def test_cancelled_subscriptions_are_released(server: ServerInfo) -> None:
    """50 idle subscriptions (40 purerpc on 5 connections, 10 grpcio calls on one channel);
    cancelling them (grpcio: RST_STREAM, connection kept; purerpc: connection closed) frees
    them on the server within the heartbeat (≤ 2 s) plus slack."""
    feed = server.feed
    assert feed is not None
    # Only the heartbeat, not the checkpoint interval, may notice that a client went away.
    request = pb.SubscribeAllRequest(include_existing=False, checkpoint_interval_ms=60_000)
    grpcio_client = GrpcioClient(server.port)
    calls = [grpcio_client.stream_sync("SubscribeToAll", request) for _ in range(10)]
    try:
        with trio.fail_after(40):
            for call in calls:
                first = await trio.to_thread.run_sync(next, call)
                assert first.WhichOneof("kind") == "caught_up"
            async with trio.open_nursery() as nursery:
                closing = [trio.Event() for _ in range(5)]

                async def connection(close: trio.Event, task_status: trio.TaskStatus[None],
                                     ) -> None:
                    async with purerpc_channel(server.port) as channel:
                        for _ in range(8):
                            stream = await open_raw_subscription(channel, "SubscribeToAll",
                                                                 request)
                            await read_raw(stream, Sub("idle"), is_caught_up)
                        task_status.started()
                        await close.wait()

                for close in closing:
                    await nursery.start(connection, close)
                assert feed.subscribers == 50
                for call in calls:
                    call.cancel()
                grpcio_seconds = await wait_for_subscribers(feed, 40, HEARTBEAT_SECONDS + 4)
                for close in closing:
                    close.set()
            purerpc_seconds = await wait_for_subscribers(feed, 0, HEARTBEAT_SECONDS + 4)
            print(f"released after {grpcio_seconds:.2f} s (grpcio cancel), "
                  f"{purerpc_seconds:.2f} s (purerpc channel closed)")
            # And the server still serves subscriptions.
            sub = await collect("purerpc", server.port, "SubscribeToAll", request, is_caught_up)
            assert sub.kinds == ["caught_up"]
            await wait_for_subscribers(feed, 0, HEARTBEAT_SECONDS + 4)
    finally:
        grpcio_client.close()


# =================================================================================================
# 7. Shutdown
# =================================================================================================


@pytest.mark.slow
async def test_shutdown_ends_subscriptions_with_unavailable(nursery: trio.Nursery,
                                                            database_url: str) -> None:
    shutdown = trio.Event()
    stopped = trio.Event()

    async def run_server(task_status: trio.TaskStatus[ServerInfo]) -> None:
        await serve(make_settings(database_url), shutdown=shutdown, task_status=task_status)
        stopped.set()

    info: ServerInfo = await nursery.start(run_server)
    acks = Acks()
    async with PurerpcClient.connect(info.port) as client:
        await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Created"] * 50)
    requests = [
        ("SubscribeToAll", pb.SubscribeAllRequest(include_existing=False)),
        ("SubscribeToAll", pb.SubscribeAllRequest(include_existing=True, max_batch_size=10)),
        ("SubscribeToStream", pb.SubscribeRequest(stream_type="Order", include_existing=True)),
    ]
    outcomes: dict[str, Ended | str] = {}
    subs: list[Sub] = []

    async def subscription(kind: str, method: str, request: Any, name: str) -> None:
        sub = Sub(name)
        subs.append(sub)
        try:
            if kind == "purerpc":
                await collect_purerpc(info.port, method, request, sub, lambda s: False)
            else:
                await collect_grpcio(info.port, method, request, sub, lambda s: False)
        except Ended as ended:
            outcomes[name] = ended
        else:
            outcomes[name] = "returned"

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            for kind in CLIENTS:
                for no, (method, request) in enumerate(requests):
                    inner.start_soon(subscription, kind, method, request,
                                     f"{kind} {method} #{no}")
            await wait_until(lambda: len(subs) == 6 and all(s.caught_up for s in subs), 10,
                             "every subscription caught up")
            shutdown.set()
            with trio.move_on_after(10) as waited:
                await stopped.wait()
                inner.cancel_scope.deadline = trio.current_time() + 5
        assert not waited.cancelled_caught, "serve did not return after the shutdown request"
    missing = {s.name for s in subs} - outcomes.keys()
    assert not missing, f"no status within 5 s of the server stopping: {missing}"
    for name, outcome in outcomes.items():
        assert isinstance(outcome, Ended), f"{name}: {outcome}"
        assert outcome.code == "UNAVAILABLE", f"{name}: {outcome}"
        # The server's own status, not a transport error (grpcio also says UNAVAILABLE
        # for a dropped connection).
        assert "shut" in outcome.message, f"{name}: {outcome}"


# =================================================================================================
# 4b. Starting positions around the window's edge
# =================================================================================================


async def test_subscribing_from_positions_around_the_windows_edge(server: ServerInfo) -> None:
    """From every position around the window's oldest event (and 0, and the head), with and
    without batches, by position and by stream version: exactly the later events, then
    caught_up at the head. (An off-by-one at the window's edge loses or repeats one event.)"""
    feed = server.feed
    assert feed is not None and feed.window is not None
    stream_id = str(uuid.uuid4())
    acks = Acks()
    with trio.fail_after(40):
        async with trio.open_nursery() as follower:
            # The feed fills the window only while someone follows the head.
            follower.start_soon(collect, "purerpc", server.port, "SubscribeToAll",
                                pb.SubscribeAllRequest(), lambda sub: False)
            await wait_until(lambda: feed.subscribers == 1, 5, "the follower subscribed")
            async with PurerpcClient.connect(server.port) as client:
                for _ in range(WINDOW_EVENTS + 36):  # one event each: positions = versions
                    await append(client, acks, stream_id, "Order", ["Order.Created"])
            await wait_until(lambda: feed.window is not None and feed.window.end >= acks.head,
                             5, "the feed read every commit")
            follower.cancel_scope.cancel()
        start, head = feed.window.start, acks.head
        assert 0 < start < head, "the window evicted nothing: the test tests nothing"
        truth = await everything(server.port)
        assert [e.position for e in truth] == [e.version for e in truth]
        edges = sorted({0, 1, start - 2, start - 1, start, start + 1, start + 2, head - 1, head})
        for after in edges:
            for max_batch in (0, 5):
                requests: list[tuple[str, Any]] = [
                    ("SubscribeToAll", pb.SubscribeAllRequest(
                        include_existing=True, from_position=after, max_batch_size=max_batch)),
                    ("SubscribeToStream", pb.SubscribeRequest(
                        stream_type="Order", include_existing=True, from_position=after,
                        max_batch_size=max_batch)),
                    ("SubscribeToStream", pb.SubscribeRequest(
                        stream_type="Order", stream_id=stream_id, include_existing=True,
                        from_version=after, max_batch_size=max_batch)),
                ]
                for method, request in requests:
                    sub = await collect("purerpc", server.port, method, request, is_caught_up,
                                        f"{method} after {after} (window starts at {start}), "
                                        f"max_batch_size={max_batch}")
                    assert_same_events(sub, [e for e in truth if e.position > after])
                    assert sub.caught_up == [(head - after, head)], sub.name


# =================================================================================================
# Edge cases found by these tests (a strict xfail is a known limitation, documented)
# =================================================================================================


async def test_caught_up_arrives_when_from_position_is_beyond_the_head(
        server: ServerInfo) -> None:
    acks = Acks()
    async with PurerpcClient.connect(server.port) as client:
        await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Created"] * 3)
    with trio.fail_after(20):
        await _caught_up_beyond_the_head(server, acks)


async def _caught_up_beyond_the_head(server: ServerInfo, acks: Acks) -> None:
    for method, request in (
        ("SubscribeToAll", pb.SubscribeAllRequest(include_existing=True,
                                                  from_position=acks.head + 10)),
        ("SubscribeToStream", pb.SubscribeRequest(stream_type="Order", include_existing=True,
                                                  from_position=acks.head + 10)),
    ):
        started = time.monotonic()
        sub = await collect("purerpc", server.port, method, request,
                            lambda s, t=started: bool(s.caught_up) or time.monotonic() - t > 3)
        assert sub.caught_up, f"{method}: no caught_up in 3 s, only {sub.kinds}"


@pytest.mark.slow
async def test_shutdown_ends_a_stalled_subscription_with_unavailable(
        nursery: trio.Nursery, database_url: str) -> None:
    shutdown = trio.Event()
    info = await start_server(nursery, make_settings(database_url), shutdown)
    acks = Acks()
    async with PurerpcClient.connect(info.port) as client:
        for _ in range(4):  # ~150 KB of events: more than the client's 64 KiB window
            await append(client, acks, str(uuid.uuid4()), "Order", ["Order.Created"] * 250)
    stalled = Sub("stalled")
    outcome: Ended | None = None
    dropped = ""
    with trio.fail_after(20):
        try:
            async with purerpc_channel(
                    0, SmallWindowChannel("127.0.0.1", info.port, 64 * 1024)) as channel:
                stream = await open_raw_subscription(
                    channel, "SubscribeToAll", pb.SubscribeAllRequest(include_existing=True))
                await read_raw(stream, stalled, has_events(10))
                await trio.sleep(1)  # the server fills the window and blocks
                shutdown.set()
                await trio.sleep(2)
                # Read again: what was sent, then the server's status.
                with trio.move_on_after(5):
                    try:
                        await read_raw(stream, stalled, lambda s: False)
                    except Ended as ended:
                        outcome = ended
        except* (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as group:
            dropped = f"; the connection was dropped ({group.exceptions[0]!r})"
    assert outcome is not None, (
        f"no status within 5 s of reading again ({len(stalled.events)} events read){dropped}")
    assert outcome.code == "UNAVAILABLE" and "shut" in outcome.message, outcome
