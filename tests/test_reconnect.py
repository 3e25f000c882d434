"""The server survives a PostgreSQL restart: the writer reconnects, no acknowledged event is
lost or stored twice, and while the database is down clients hear UNAVAILABLE (never a false
success).

These tests stop and start a *private* embedded PostgreSQL in the test's tmp_path; the shared
session cluster is never touched.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass

import orjson
import pytest
import trio

from eventstore.config import Settings
from eventstore.embedded import EmbeddedPostgres
from eventstore.server import serve
from eventstore.v1 import eventstore_pb2 as pb
from tests.clients import PurerpcClient, RpcError
from tests.conftest import make_settings

pytestmark = pytest.mark.slow

STREAM_TYPE = "Account"


def settings_for(url: str, retry_seconds: float) -> Settings:
    return make_settings(url, writer_retry_seconds=retry_seconds)


def request(stream_id: str, n: int, tag: str,
            expected: int | None = None) -> pb.AppendEventsRequest:
    req = pb.AppendEventsRequest(
        stream_id=stream_id, stream_type=STREAM_TYPE,
        events=[pb.NewEvent(event_id=str(uuid.uuid4()), event_type=f"{tag}{j}",
                            data=orjson.dumps({"tag": tag, "j": j})) for j in range(n)])
    if expected is not None:
        req.expected_version = expected
    return req


def assert_plain(message: str) -> None:
    """A status message in plain words: no repr, no traceback, no driver internals."""
    assert message.strip(), "empty status message"
    assert "Traceback" not in message, message
    assert not re.search(r"\b\w+(Error|Exception)\(|<[\w.]+ object at|psycopg|File \"",
                         message), message


@dataclass(frozen=True)
class Ack:
    request: pb.AppendEventsRequest
    reply: pb.AppendEventsResponse


class Ledger:
    def __init__(self) -> None:
        self.acks: list[Ack] = []
        self.sent_ids: set[str] = set()

    def sent(self, req: pb.AppendEventsRequest) -> None:
        self.sent_ids.update(e.event_id for e in req.events)

    def add(self, req: pb.AppendEventsRequest, reply: pb.AppendEventsResponse) -> None:
        assert list(reply.event_ids) == [e.event_id for e in req.events]
        self.acks.append(Ack(req, reply))


class Reads:
    """Reads after recovery; counts UNAVAILABLE answers (each is a recovery defect)."""

    def __init__(self, client: PurerpcClient) -> None:
        self.client = client
        self.unavailable: list[str] = []

    async def call(self, method: str, req: object) -> object:
        for _ in range(20):
            try:
                return await self.client.call(method, req)  # type: ignore[arg-type]
            except RpcError as err:
                if err.code != "UNAVAILABLE":
                    raise
                self.unavailable.append(f"{method}: {err.message}")
                await trio.sleep(0.5)
        raise AssertionError(f"{method} still UNAVAILABLE after the database came back")

    async def stream(self, stream_id: str) -> list[pb.Event]:
        out: list[pb.Event] = []
        from_version = 0
        for _ in range(10_000):
            reply = await self.call("GetEvents", pb.GetEventsRequest(
                stream_id=stream_id, stream_type=STREAM_TYPE, from_version=from_version,
                max_count=7))
            assert isinstance(reply, pb.GetEventsResponse)
            out.extend(reply.events)
            if not reply.has_more:
                return out
            from_version = reply.next_from_version
        raise AssertionError("GetEvents paging did not end")

    async def all(self) -> list[pb.Event]:
        out: list[pb.Event] = []
        after = 0
        for _ in range(10_000):
            reply = await self.call("ReadAll", pb.ReadAllRequest(from_position=after,
                                                                  max_count=11))
            assert isinstance(reply, pb.ReadAllResponse)
            out.extend(reply.events)
            assert reply.next_from_position >= after
            after = reply.next_from_position
            if not reply.has_more:
                return out
        raise AssertionError("ReadAll paging did not end")


async def check_stored(reads: Reads, ledger: Ledger, streams: list[str]) -> None:
    """Every acknowledged event stored exactly once, where its reply said; versions without
    holes; nothing stored that no reply acknowledged."""
    acked: dict[str, tuple[str, int]] = {}  # event id -> (stream, version)
    for ack in ledger.acks:
        n = len(ack.request.events)
        first_version = ack.reply.next_expected_version - n + 1
        assert first_version >= 1
        for j, event_id in enumerate(ack.reply.event_ids):
            assert event_id not in acked, f"event {event_id} acknowledged twice"
            acked[event_id] = (str(uuid.UUID(ack.request.stream_id)), first_version + j)

    everything = await reads.all()
    by_id = {e.event_id: e for e in everything}
    for ack in ledger.acks:
        first, last = ack.reply.event_ids[0], ack.reply.event_ids[-1]
        if first in by_id and last in by_id:
            assert by_id[first].position == ack.reply.first_position
            assert by_id[last].position == ack.reply.last_position
    ids = [e.event_id for e in everything]
    assert len(ids) == len(set(ids)), "an event is stored twice"
    positions = [e.position for e in everything]
    assert all(a < b for a, b in itertools.pairwise(positions))
    assert set(ids) == set(acked), (
        f"stored but not acknowledged: {sorted(set(ids) - set(acked))}; "
        f"acknowledged but not stored: {sorted(set(acked) - set(ids))}")
    assert set(ids) <= ledger.sent_ids

    per_stream: dict[str, list[int]] = defaultdict(list)
    for e in everything:
        assert (e.stream_id, e.version) == acked[e.event_id], e.event_id
        per_stream[e.stream_id].append(e.version)
    for stream_id in streams:
        stored = await reads.stream(stream_id)
        versions = [e.version for e in stored]
        assert versions == list(range(1, len(versions) + 1)), f"holes in {stream_id}: {versions}"
        assert sorted(per_stream[stream_id]) == versions
        for e in stored:
            assert acked[e.event_id] == (stream_id, e.version)


async def test_writer_reconnects_after_database_restart(
        private_pg: tuple[EmbeddedPostgres, str]) -> None:
    pg, url = private_pg
    streams = [str(uuid.uuid4()) for _ in range(3)]
    ledger = Ledger()

    async def append(client: PurerpcClient, req: pb.AppendEventsRequest) -> None:
        ledger.sent(req)
        ledger.add(req, await client.call("AppendEvents", req))

    with trio.fail_after(150):
        async with trio.open_nursery() as server_nursery:
            info = await server_nursery.start(serve, settings_for(url, 20.0))
            async with PurerpcClient.connect(info.port) as client:
                # Before: some appends, and enough concurrent reads to fill the reader pool.
                for i in range(6):
                    await append(client, request(streams[i % 3], 2, f"before{i}"))
                async with trio.open_nursery() as readers:
                    for i in range(8):
                        readers.start_soon(client.call, "GetEvents", pb.GetEventsRequest(
                            stream_id=streams[i % 3], stream_type=STREAM_TYPE))

                # Outage: appends sent while PostgreSQL is down wait for it (or answer
                # UNAVAILABLE); none may succeed while it is down.
                await trio.to_thread.run_sync(pg.stop)
                down = True
                during = [
                    request(streams[0], 3, "during0"),
                    request(streams[1], 1, "during1", expected=4),  # 2 appends of 2 before
                    request(streams[2], 5, "during2"),
                    request(str(uuid.uuid4()), 2, "during3", expected=0),
                ]
                streams.append(during[3].stream_id)
                outcomes: dict[int, pb.AppendEventsResponse | RpcError] = {}
                success_while_down: list[int] = []

                async def send(i: int, req: pb.AppendEventsRequest) -> None:
                    ledger.sent(req)
                    try:
                        outcomes[i] = await client.call("AppendEvents", req)
                        if down:
                            success_while_down.append(i)
                    except RpcError as err:
                        outcomes[i] = err

                async with trio.open_nursery() as pending:
                    for i, req in enumerate(during):
                        pending.start_soon(send, i, req)
                    await trio.sleep(2.0)
                    early = dict(outcomes)
                    down = False  # set just before the restart: a reply racing it is fine
                    await trio.to_thread.run_sync(pg.start)
                    # leaving the nursery waits for the pending appends
                assert not success_while_down, f"appends {success_while_down} succeeded while " \
                    "PostgreSQL was down"
                for i, outcome in early.items():
                    assert isinstance(outcome, RpcError), f"append {i} succeeded while down"
                    assert outcome.code == "UNAVAILABLE", (
                        f"append {i} answered {outcome} while PostgreSQL was down")

                for i, req in enumerate(during):
                    outcome = outcomes[i]
                    if isinstance(outcome, RpcError):
                        assert outcome.code == "UNAVAILABLE", outcome
                        assert_plain(outcome.message)
                        # Retrying with the same event ids tells the outcome: stored once.
                        ledger.add(req, await client.call("AppendEvents", req))
                    else:
                        ledger.add(req, outcome)
                        # An idempotent retry returns the same result.
                        again = await client.call("AppendEvents", req)
                        assert again == outcome
                print({i: (o.code if isinstance(o, RpcError) else "OK")
                       for i, o in outcomes.items()})

                # After: appends succeed at once.
                for i in range(6):
                    await append(client, request(streams[i % 4], 2, f"after{i}"))

                reads = Reads(client)
                await check_stored(reads, ledger, streams)
                assert not reads.unavailable, (
                    "reads answered UNAVAILABLE after PostgreSQL was back and appends "
                    f"succeeded: {reads.unavailable}")
            server_nursery.cancel_scope.cancel()


async def test_unavailable_while_database_down_then_retry_succeeds(
        private_pg: tuple[EmbeddedPostgres, str]) -> None:
    pg, url = private_pg
    ledger = Ledger()
    with trio.fail_after(120):
        async with trio.open_nursery() as server_nursery:
            info = await server_nursery.start(serve, settings_for(url, 1.0))
            async with PurerpcClient.connect(info.port) as client:
                before = request(str(uuid.uuid4()), 3, "before")
                ledger.sent(before)
                ledger.add(before, await client.call("AppendEvents", before))

                await trio.to_thread.run_sync(pg.stop)
                stream = str(uuid.uuid4())
                req = request(stream.upper(), 3, "outage", expected=0)
                ledger.sent(req)
                started = trio.current_time()
                with trio.fail_after(30), pytest.raises(RpcError) as err:
                    await client.call("AppendEvents", req)
                elapsed = trio.current_time() - started
                assert err.value.code == "UNAVAILABLE", err.value
                assert_plain(err.value.message)
                print(f"append answered UNAVAILABLE after {elapsed:.1f}s: {err.value.message}")

                with trio.fail_after(30), pytest.raises(RpcError) as read_err:
                    await client.call("GetEvents", pb.GetEventsRequest(
                        stream_id=stream, stream_type=STREAM_TYPE))
                assert read_err.value.code == "UNAVAILABLE", read_err.value
                assert_plain(read_err.value.message)
                with trio.fail_after(30), pytest.raises(RpcError) as all_err:
                    await client.call("ReadAll", pb.ReadAllRequest())
                assert all_err.value.code == "UNAVAILABLE", all_err.value
                assert_plain(all_err.value.message)

                await trio.to_thread.run_sync(pg.start)
                with trio.fail_after(30):
                    reply = await client.call("AppendEvents", req)
                assert reply.next_expected_version == 3
                ledger.add(req, reply)
                # Once more: an idempotent retry, the same answer, nothing written.
                assert await client.call("AppendEvents", req) == reply

                reads = Reads(client)
                stored = await reads.stream(stream)
                assert [e.event_id for e in stored] == [e.event_id for e in req.events]
                assert [e.version for e in stored] == [1, 2, 3]
                await check_stored(reads, ledger, [before.stream_id.lower(), stream])
                assert not reads.unavailable, (
                    f"reads answered UNAVAILABLE after PostgreSQL was back: {reads.unavailable}")
            server_nursery.cancel_scope.cancel()


async def test_outage_under_write_load_loses_and_duplicates_nothing(
        private_pg: tuple[EmbeddedPostgres, str]) -> None:
    """Writers keep appending (with expected versions and client event ids) while PostgreSQL
    goes away for longer than writer_retry_seconds and comes back; each retries UNAVAILABLE
    with the same request. Every stream ends up with each request stored exactly once."""
    pg, url = private_pg
    writers, appends = 8, 30
    streams = [str(uuid.uuid4()) for _ in range(writers)]
    ledger = Ledger()
    unavailable = 0

    async def write(no: int, client: PurerpcClient) -> None:
        nonlocal unavailable
        version = 0
        for i in range(appends):
            req = request(streams[no], 1 + (i % 3), f"w{no}a{i}", expected=version)
            ledger.sent(req)
            for _ in range(100):
                try:
                    reply = await client.call("AppendEvents", req)
                    break
                except RpcError as err:
                    failure = err
                assert failure.code == "UNAVAILABLE", failure
                assert_plain(failure.message)
                unavailable += 1
                await trio.sleep(0.2)
            else:
                raise AssertionError(f"writer {no}: append {i} never succeeded")
            assert reply.next_expected_version == version + len(req.events)
            ledger.add(req, reply)
            version = reply.next_expected_version
            await trio.sleep(0.02)

    with trio.fail_after(150):
        async with trio.open_nursery() as server_nursery:
            info = await server_nursery.start(serve, settings_for(url, 2.0))
            async with PurerpcClient.connect(info.port) as client:
                async with trio.open_nursery() as load:
                    for no in range(writers):
                        load.start_soon(write, no, client)
                    await trio.sleep(0.5)
                    await trio.to_thread.run_sync(pg.stop)
                    await trio.sleep(3.5)
                    await trio.to_thread.run_sync(pg.start)
                print(f"{unavailable} UNAVAILABLE answers retried")
                reads = Reads(client)
                await check_stored(reads, ledger, streams)
                for stream in streams:
                    stored = await reads.stream(stream)
                    assert len(stored) == sum(1 + (i % 3) for i in range(appends))
                assert not reads.unavailable, reads.unavailable
            server_nursery.cancel_scope.cancel()
