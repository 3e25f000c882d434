"""Concurrency: many clients on one stream (optimistic concurrency), many clients on many
streams with a ReadAll follower, and the same across two server processes on one database.

Every loop is bounded in count and runs under `trio.fail_after`; everything is on loopback.
"""

from __future__ import annotations

import itertools
import random
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import orjson
import pytest
import trio

from eventstore.server import ServerInfo
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import PurerpcClient, RpcError
from tests.conftest import PgCluster
from tests.helpers import read_stream
from tests.processes import eventstore_process

pytestmark = pytest.mark.slow

WRONG_VERSION = re.compile(r"^wrong expected version: expected (-?\d+), actual (-?\d+)$")


# -- helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """One acknowledged append: what the response said."""

    stream_id: str
    stream_type: str
    event_ids: tuple[str, ...]
    first_position: int
    last_position: int
    next_expected_version: int


@dataclass(frozen=True)
class Seen:
    """One event as a ReadAll follower saw it."""

    position: int
    event_id: str
    stream_id: str
    stream_type: str
    version: int


@dataclass
class Follower:
    seen: list[Seen] = field(default_factory=list)
    pages: int = 0


STREAM_TYPES = ("Account", "Bestellung·Größe", "ВокабулярныйЭлемент")


async def writer(port: int, writer_no: int, appends: int, acks: list[Ack]) -> None:
    """Append `appends` batches of 1-20 events to a few streams of its own, no expected
    version; a mix of client-chosen and server-assigned event ids. Every append must succeed."""
    rng = random.Random(writer_no)
    streams = [(str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                STREAM_TYPES[(writer_no + k) % len(STREAM_TYPES)]) for k in range(3)]
    async with PurerpcClient.connect(port) as client:
        for i in range(appends):
            stream_id, stream_type = rng.choice(streams)
            n = rng.randint(1, 20)
            given = [str(uuid.UUID(int=rng.getrandbits(128), version=4))
                     if rng.random() < 0.7 else "" for _ in range(n)]
            events = [
                pb.NewEvent(event_id=event_id.upper() if j % 2 else event_id,
                            event_type=f"Happened{j % 4}",
                            data=orjson.dumps({"writer": writer_no, "append": i, "j": j}),
                            metadata=b'{"w": %d}' % writer_no if j % 3 == 0 else b"")
                for j, event_id in enumerate(given)
            ]
            reply = await client.call("AppendEvents", pb.AppendEventsRequest(
                stream_id=stream_id.upper() if i % 2 else stream_id, stream_type=stream_type,
                events=events))
            ids = tuple(reply.event_ids)
            assert len(ids) == n
            for mine, stored in zip(given, ids, strict=True):
                assert str(uuid.UUID(stored)) == stored  # lower-case canonical
                if mine:
                    assert stored == mine
            assert reply.last_position >= reply.first_position + n - 1
            assert reply.next_expected_version >= n
            acks.append(Ack(stream_id, stream_type, ids, reply.first_position,
                            reply.last_position, reply.next_expected_version))


async def follow(port: int, writers_done: trio.Event, follower: Follower,
                 page: int = 500) -> None:
    """Follow ReadAll from the start until the writers are done and it has caught up."""
    position = 0
    async with PurerpcClient.connect(port) as client:
        for _ in range(200_000):
            finished = writers_done.is_set()  # before the read: then an empty page is the end
            reply = await client.call("ReadAll", pb.ReadAllRequest(
                from_position=position, max_count=page))
            follower.pages += 1
            assert len(reply.events) <= page
            for e in reply.events:
                follower.seen.append(Seen(e.position, e.event_id, e.stream_id, e.stream_type,
                                          e.version))
            if reply.events:
                assert reply.events[0].position > position
                assert reply.next_from_position >= reply.events[-1].position
            assert reply.next_from_position >= position
            position = reply.next_from_position
            if not reply.events and not reply.has_more:
                if finished:
                    return
                await trio.sleep(0.01)
    raise AssertionError("the ReadAll follower did not catch up within its page budget")


def check_follower(name: str, follower: Follower, acks: list[Ack]) -> None:
    """Every acknowledged event seen exactly once, in ascending positions, where the append's
    response said; per stream, versions 1..n in position order."""
    seen = follower.seen
    positions = [s.position for s in seen]
    assert all(a < b for a, b in itertools.pairwise(positions)), (
        f"{name}: positions not strictly ascending")
    ids = [s.event_id for s in seen]
    by_id = {s.event_id: s for s in seen}
    assert len(by_id) == len(ids), f"{name}: some event seen more than once"

    acked = {event_id for ack in acks for event_id in ack.event_ids}
    assert len(acked) == sum(len(ack.event_ids) for ack in acks), "an event id acknowledged twice"
    missing = acked - by_id.keys()
    unexpected = by_id.keys() - acked
    assert not missing, f"{name}: {len(missing)} acknowledged events never seen"
    assert not unexpected, f"{name}: {len(unexpected)} events seen that were not acknowledged"

    for ack in acks:
        mine = [by_id[event_id] for event_id in ack.event_ids]
        got = [s.position for s in mine]
        assert all(a < b for a, b in itertools.pairwise(got)), (
            f"{name}: an append's events not in its order")
        said = (ack.first_position, ack.last_position)
        assert (got[0], got[-1]) == said, (
            f"{name}: append answered positions {said}, follower saw {got[0]}..{got[-1]}")
        n = len(ack.event_ids)
        assert [s.version for s in mine] == list(
            range(ack.next_expected_version - n + 1, ack.next_expected_version + 1))
        assert all(s.stream_id == ack.stream_id and s.stream_type == ack.stream_type
                   for s in mine)

    per_stream: dict[tuple[str, str], list[int]] = defaultdict(list)
    for s in seen:
        per_stream[(s.stream_id, s.stream_type)].append(s.version)
    for key, versions in per_stream.items():
        assert versions == list(range(1, len(versions) + 1)), f"{name}: stream {key} has holes"


def check_acks(acks: list[Ack]) -> None:
    """Per stream, the acknowledged version ranges tile 1..n exactly."""
    per_stream: dict[tuple[str, str], list[int]] = defaultdict(list)
    for ack in acks:
        n = len(ack.event_ids)
        per_stream[(ack.stream_id, ack.stream_type)].extend(
            range(ack.next_expected_version - n + 1, ack.next_expected_version + 1))
    for key, versions in per_stream.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), (
            f"stream {key}: acknowledged versions overlap or leave holes")


async def run_workload(writer_ports: list[int], follower_ports: list[int], *, writers: int,
                       appends_per_writer: int) -> tuple[list[Ack], list[Follower]]:
    acks: list[Ack] = []
    followers = [Follower() for _ in follower_ports]
    writers_done = trio.Event()
    async with trio.open_nursery() as nursery:
        for port, follower in zip(follower_ports, followers, strict=True):
            nursery.start_soon(follow, port, writers_done, follower)
        async with trio.open_nursery() as writing:
            for w in range(writers):
                writing.start_soon(writer, writer_ports[w % len(writer_ports)], w,
                                   appends_per_writer, acks)
        writers_done.set()
    assert len(acks) == writers * appends_per_writer
    return acks, followers


# -- one stream, optimistic concurrency ---------------------------------------------------


async def test_32_clients_race_on_one_stream_with_expected_versions(server: ServerInfo) -> None:
    clients, k = 32, 5
    total = clients * k
    stream_id, stream_type = str(uuid.uuid4()), "Counter"
    successes: list[tuple[int, int, str]] = []  # (client, next_expected_version, event_id)
    conflicts = 0
    # A failed attempt of one client needs a success of another inside it (attempts of one
    # client do not overlap), so no client can fail more often than there are successes.
    max_attempts = total + k + 8

    async def contender(no: int) -> None:
        nonlocal conflicts
        wins = 0
        async with PurerpcClient.connect(server.port) as client:
            for _ in range(max_attempts):
                head = await client.call("GetEvents", pb.GetEventsRequest(
                    stream_id=stream_id, stream_type=stream_type, max_count=1))
                version = head.stream_version
                event_id = str(uuid.uuid4())
                request = pb.AppendEventsRequest(
                    stream_id=stream_id, stream_type=stream_type, expected_version=version,
                    events=[pb.NewEvent(event_id=event_id, event_type="Incremented",
                                        data=orjson.dumps({"client": no, "seen": version}))])
                try:
                    reply = await client.call("AppendEvents", request)
                except RpcError as err:
                    conflict = err
                else:
                    conflict = None
                if conflict is not None:
                    assert conflict.code == "ABORTED", conflict
                    match = WRONG_VERSION.match(conflict.message)
                    assert match, conflict.message
                    assert int(match[1]) == version, conflict.message
                    assert int(match[2]) > version, conflict.message
                    conflicts += 1
                    continue
                assert reply.next_expected_version == version + 1
                assert list(reply.event_ids) == [event_id]
                assert reply.first_position == reply.last_position
                successes.append((no, reply.next_expected_version, event_id))
                wins += 1
                if wins == k:
                    return
        raise AssertionError(f"client {no} got only {wins} of {k} appends in {max_attempts} tries")

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for no in range(clients):
                nursery.start_soon(contender, no)

        versions = sorted(v for _, v, _ in successes)
        assert versions == list(range(1, total + 1)), "two clients got the same version"
        per_client = defaultdict(int)
        for no, _, _ in successes:
            per_client[no] += 1
        assert all(per_client[no] == k for no in range(clients))

        async with PurerpcClient.connect(server.port) as client:
            stored = await read_stream(client, stream_id, stream_type, page=37)
            head = await client.call("GetEvents", pb.GetEventsRequest(
                stream_id=stream_id, stream_type=stream_type, max_count=1))
    assert head.stream_version == total
    assert [e.version for e in stored] == list(range(1, total + 1))
    by_version = {v: event_id for _, v, event_id in successes}
    assert [e.event_id for e in stored] == [by_version[v] for v in range(1, total + 1)]
    assert len({e.event_id for e in stored}) == total
    positions = [e.position for e in stored]
    assert all(a < b for a, b in itertools.pairwise(positions))
    # Not an assertion of the contract, but a race that never conflicts tests nothing.
    print(f"{conflicts} conflicts for {total} appends")


# -- many streams, ReadAll follower ------------------------------------------------------


async def test_64_writers_many_streams_with_a_readall_follower(server: ServerInfo) -> None:
    with trio.fail_after(180):
        acks, (follower,) = await run_workload([server.port], [server.port], writers=64,
                                               appends_per_writer=12)
    check_acks(acks)
    check_follower("follower", follower, acks)


# -- two server processes on one database ----------------------------------------------------


async def test_two_server_processes_one_database(pg_cluster: PgCluster) -> None:
    database_url = pg_cluster.fresh_database()
    with trio.fail_after(240):
        async with eventstore_process(database_url) as one, \
                eventstore_process(database_url) as two:
            assert one.port != two.port
            acks, followers = await run_workload([one.port, two.port], [one.port, two.port],
                                                 writers=64, appends_per_writer=12)
    check_acks(acks)
    check_follower("follower on process 1", followers[0], acks)
    check_follower("follower on process 2", followers[1], acks)
    assert followers[0].seen == followers[1].seen
    for proc in (one, two):
        tail = "\n".join(proc.stderr[-20:])
        assert proc.returncode == 0, f"serve exited with {proc.returncode} on SIGTERM:\n{tail}"
        assert not any("Traceback" in line for line in proc.stderr), tail
