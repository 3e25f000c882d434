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
- cancelled subscriptions are released; a shutdown ends subscriptions with UNAVAILABLE.

Every loop is bounded in count and runs under `trio.fail_after`; everything is on loopback.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
import purerpc
import pytest
import trio
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration

from eventstore.config import Settings
from eventstore.server import ServerInfo, serve
from eventstore.store.subscriptions import HEARTBEAT_SECONDS, LiveFeed
from eventstore.v1 import eventstore_grpc
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import GrpcioClient, PurerpcClient
from tests.conftest import PgCluster, make_settings
from tests.helpers import read_all

CLIENTS = ("purerpc", "grpcio")


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


async def collect_purerpc(port: int, method: str, request: Any, sub: Sub, done: Done) -> Sub:
    async with purerpc.insecure_channel("127.0.0.1", port) as channel:
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
    subs: dict[str, Sub] = {}

    async def subscriber(name: str, history_head: int) -> None:
        request = pb.SubscribeAllRequest(include_existing=True, filter=FILTERS[name],
                                         checkpoint_interval_ms=100)

        def done(s: Sub) -> bool:
            target = targets[name]
            if target is None or len(s.events) < target:
                return False
            # The hiding filter is done when a checkpoint has passed every hidden event.
            return target > 0 or any(p >= acks.head for _, _, p in s.checkpoints)

        subs[name] = await collect(kind, server.port, "SubscribeToAll", request, done, name)
        assert_caught_up_once(subs[name], history_head=history_head)

    with trio.fail_after(40):
        async with PurerpcClient.connect(server.port) as client:
            await write_mixture(client, acks, rng, 60, streams)
            async with trio.open_nursery() as nursery:
                for name in FILTERS:
                    nursery.start_soon(subscriber, name, acks.head)
                await write_mixture(client, acks, rng, 60, streams)
                stored = await everything(server.port)
                assert {e.event_id for e in stored} == acks.ids()
                for name, f in FILTERS.items():
                    targets[name] = sum(1 for e in stored if matches(e, f))
    for name, f in FILTERS.items():
        sub = subs[name]
        assert_same_events(sub, [e for e in stored if matches(e, f)])
        checkpoints = [p for _, _, p in sub.checkpoints]
        assert checkpoints == sorted(checkpoints), f"{name}: checkpoints went back"
    assert targets["nothing matches"] == 0 and targets["wildcards"]
    hidden = subs["nothing matches"]
    assert not hidden.events and hidden.checkpoints[-1][2] >= stored[-1].position


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
                    async def run(method: str = method, request: Any = request) -> None:
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
            gaps = [b - a for a, b in itertools.pairwise([sub.caught_up and started, *times])]
            assert max(gaps[1:]) < 0.6, f"checkpoint gaps {gaps}"
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
