"""The writer's one-round-trip commit: its guesses of the head and of stream versions are
checked by PostgreSQL under the append lock, and a wrong guess is never a wrong answer.

Two `AppendWriter`s on one database stand for two server processes; each counts its guesses
(hit, miss) in its own metrics, so every test also shows which path each append took.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
import trio

from eventstore._es_codec import AppendRequest
from eventstore.errors import WrongExpectedVersion
from eventstore.metrics import Metrics
from eventstore.store.writer import INSERT_MAX_EVENTS, AppendWriter
from eventstore.v1 import eventstore_pb2 as pb
from tests.conftest import PgCluster, make_settings
from tests.helpers import (
    STREAM_TYPE,
    append_request,
    events,
    new_event,
    sid,
    until_the_append_lock_is_awaited,
)


class Writer:
    def __init__(self, writer: AppendWriter, metrics: Metrics) -> None:
        self.writer = writer
        self.metrics = metrics

    async def append(self, stream: str, evs: list[pb.NewEvent], expected: int | None = None,
                     ) -> pb.AppendEventsResponse:
        raw = append_request(stream, evs, expected).SerializeToString()
        with trio.fail_after(30):
            reply = await self.writer.append(AppendRequest.parse(raw, 10_000, 1 << 20))
        return pb.AppendEventsResponse.FromString(reply)

    def guesses(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("eventstore_append_guesses_total",
                                                       {"outcome": outcome})
        return value or 0.0


@pytest.fixture
async def writers(nursery: trio.Nursery, database_url: str) -> AsyncIterator[list[Writer]]:
    """Two writers on one database, as two server processes would have."""
    settings = make_settings(database_url)
    found = []
    for _ in range(2):
        metrics = Metrics()
        writer = AppendWriter(database_url, settings, metrics)
        await nursery.start(writer.run)
        found.append(Writer(writer, metrics))
    yield found
    nursery.cancel_scope.cancel()


def stored(database_url: str) -> list[tuple[int, str, int]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT position, stream_id::text, version FROM events"
                            " ORDER BY position").fetchall()
    return [(int(p), s, int(v)) for p, s, v in rows]


async def test_another_writer_moving_the_head_turns_a_guess_into_a_miss(
        writers: list[Writer], database_url: str) -> None:
    a, b = writers
    s1, s2 = sid(), sid()
    first = await a.append(s1, events(2), expected=0)  # a knows nothing yet: two round trips
    assert (first.first_position, a.guesses("hit"), a.guesses("miss")) == (1, 0, 0)
    second = await a.append(s1, events(1), expected=2)
    assert (second.first_position, second.next_expected_version) == (3, 3)
    assert a.guesses("hit") == 1
    await b.append(s2, events(3), expected=0)  # positions 4-6, behind a's back
    third = await a.append(s1, events(1), expected=3)
    assert (third.first_position, third.next_expected_version) == (7, 4)
    assert (a.guesses("hit"), a.guesses("miss")) == (1, 1)
    await a.append(s1, events(1), expected=4)  # the batch after a miss does not guess
    assert (a.guesses("hit"), a.guesses("miss")) == (1, 1)
    fifth = await a.append(s1, events(1), expected=5)
    assert (fifth.first_position, a.guesses("hit")) == (9, 2)
    rows = stored(database_url)
    assert [p for p, _, _ in rows] == list(range(1, 10))
    assert [v for _, s, v in rows if s == s1] == [1, 2, 3, 4, 5, 6]
    assert [v for _, s, v in rows if s == s2] == [1, 2, 3]


async def test_a_wrong_version_guess_is_answered_as_the_conflict_it_is(
        writers: list[Writer], database_url: str) -> None:
    a, b = writers
    s1, missing, elsewhere = sid(), sid(), sid()
    await b.append(elsewhere, events(3), expected=0)  # a has never seen this stream
    await a.append(s1, events(1), expected=0)
    # A stream a has not seen: a guesses the version the client names, PostgreSQL refuses it.
    with pytest.raises(WrongExpectedVersion) as err:
        await a.append(missing, events(1), expected=5)
    assert (err.value.expected, err.value.actual) == (5, 0)
    assert a.guesses("miss") == 1
    await a.append(s1, events(1), expected=1)  # not guessed (backoff); a learns the head
    with pytest.raises(WrongExpectedVersion) as err:
        await a.append(elsewhere, events(1), expected=0)
    assert (err.value.expected, err.value.actual) == (0, 3)
    assert a.guesses("miss") == 2
    assert [p for p, _, _ in stored(database_url)] == [1, 2, 3, 4, 5]
    # Once seen, the stream's version is known and a right expectation commits in one go.
    for _ in range(3):  # the backoff doubled: two batches go the usual way first
        reply = await a.append(elsewhere, events(1), expected=None)
    hits = a.guesses("hit")
    reply = await a.append(elsewhere, events(1), expected=reply.next_expected_version)
    assert (reply.next_expected_version, a.guesses("hit")) == (7, hits + 1)


@pytest.mark.parametrize("size", [3, INSERT_MAX_EVENTS + 36], ids=["insert", "copy"])
async def test_a_guessed_batch_commits_in_one_round_trip_and_retries_stay_retries(
        writers: list[Writer], database_url: str, size: int) -> None:
    """A small batch is committed from the event loop, a larger one (binary COPY) from the
    worker thread; either way a retry that meets its stored ids is answered as a retry."""
    a, _ = writers
    stream = sid()
    await a.append(stream, events(size, with_ids=True), expected=0)
    batch = events(size, with_ids=True)
    original = await a.append(stream, batch, expected=size)
    assert a.guesses("hit") == 1
    # Retried with the expected version it was sent with (now stale: a conflict to the cache,
    # so the usual path decides), and with the stream's version now (guessed: the COPY meets
    # the stored ids, and the batch is decided again with every id looked up).
    for expected in (size, 2 * size):
        again = await a.append(stream, batch, expected=expected)
        assert again == original
    assert a.guesses("miss") == 0
    rows = stored(database_url)
    assert [p for p, _, _ in rows] == list(range(1, 2 * size + 1))
    assert [v for _, _, v in rows] == list(range(1, 2 * size + 1))


async def test_the_guard_is_checked_after_the_lock(database_url: str) -> None:
    """The guard reads head and versions after the append lock is granted: a guess made while
    another transaction holds the lock and then commits is refused, not trusted."""
    settings = make_settings(database_url)
    metrics = Metrics()
    writer = AppendWriter(database_url, settings, metrics)
    view = Writer(writer, metrics)
    stream = sid()
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await view.append(stream, events(1), expected=0)
        with psycopg.connect(database_url) as other:
            other.execute("SELECT pg_advisory_xact_lock(%s)", (0x65736170,))
            other.execute(
                "INSERT INTO events (event_id, stream_id, stream_type, version, event_type,"
                " data, position, created_at) VALUES (gen_random_uuid(), %s, %s, 2, 'X',"
                " '{}', 2, now())", (stream, STREAM_TYPE))
            other.execute(
                "UPDATE event_streams SET version = 2 WHERE stream_id = %s", (stream,))
            done: list[object] = []
            answered = trio.Event()

            async def blocked() -> None:
                try:
                    done.append(await view.append(stream, events(1), expected=1))
                except WrongExpectedVersion as exc:
                    done.append(exc)
                answered.set()

            nursery.start_soon(blocked)
            await trio.sleep(0.5)
            assert done == []  # waiting for the lock
            other.commit()
        with trio.fail_after(30):
            await answered.wait()
        assert isinstance(done[0], WrongExpectedVersion)
        assert (done[0].expected, done[0].actual) == (1, 2)
        assert metrics.registry.get_sample_value(
            "eventstore_append_guesses_total", {"outcome": "miss"}) == 1
        nursery.cancel_scope.cancel()
    assert [p for p, _, _ in stored(database_url)] == [1, 2]


async def test_a_connection_lost_between_commits_is_recovered_by_the_worker(
        writers: list[Writer], database_url: str) -> None:
    """The event loop's one-round-trip attempt meets a dead connection: the worker thread
    reconciles (nothing was stored), reconnects and commits the batch once."""
    a, _ = writers
    stream = sid()
    await a.append(stream, events(1), expected=0)
    await a.append(stream, events(1), expected=1)
    assert a.guesses("hit") == 1
    pid = a.writer.backend_pid
    with psycopg.connect(database_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    reply = await a.append(stream, events(2), expected=2)
    assert (reply.first_position, reply.next_expected_version) == (3, 4)
    assert a.writer.backend_pid != pid
    reply = await a.append(stream, events(1), expected=4)
    assert (reply.first_position, a.guesses("hit")) == (5, 2)
    assert [(p, v) for p, _, v in stored(database_url)] == [(i, i) for i in range(1, 6)]



async def test_a_bug_in_a_commit_still_answers_its_requests(database_url: str) -> None:
    """Handlers wait for their append's outcome whatever becomes of their call (so that a
    stored write is always audited): a commit that fails with an unexpected exception must
    still answer each of its requests, UNAVAILABLE, rather than leave them waiting."""
    from eventstore.errors import Unavailable

    writer = AppendWriter(database_url, make_settings(database_url))

    async def broken(batch: object) -> list[object]:
        raise RuntimeError("a bug")

    writer._commit_batch = broken  # type: ignore[method-assign,assignment]
    raw = append_request(sid(), events(1), None).SerializeToString()
    failures: list[Exception] = []

    async def run_writer(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await writer.run(task_status=task_status)
        except RuntimeError as exc:  # the writer task itself fails loudly
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_writer)
        with trio.fail_after(10), pytest.raises(Unavailable, match="may be stored"):
            await writer.append(AppendRequest.parse(raw, 10_000, 1 << 20))
    assert [str(exc) for exc in failures] == ["a bug"]


# A connection lost while its COMMIT was under way: the outcome is unknown to the writer, and the
# connection's backend may live on (the network failed, not the database).


def _cut(writer: AppendWriter) -> None:
    """The network fails under the writer's connection: its socket goes, its backend stays."""
    import os
    import socket

    assert writer._conn is not None
    sock = socket.socket(fileno=os.dup(writer._conn.pgconn.socket))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


async def _append_cut_behind_the_lock(writer: Writer, database_url: str, stream: str,
                                      evs: list[pb.NewEvent], expected: int | None,
                                      ) -> pb.AppendEventsResponse | Exception:
    """Append `evs` while another session holds the append lock; cut the writer's connection
    while its backend waits for the lock, then let the lock go."""
    from eventstore.store.writer import APPEND_LOCK_KEY

    outcome: list[pb.AppendEventsResponse | Exception] = []

    async def blocked() -> None:
        try:
            outcome.append(await writer.append(stream, evs, expected))
        except Exception as exc:
            outcome.append(exc)

    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked)
            await until_the_append_lock_is_awaited(database_url)
            _cut(writer.writer)
            await trio.sleep(1.0)  # the writer reconciles; its retry waits for the lock
            holder.rollback()  # the lock goes
    return outcome[0]


@pytest.mark.parametrize("with_ids", [True, False], ids=["client-ids", "server-ids"])
@pytest.mark.parametrize("expected", [1, None], ids=["expected", "any"])
async def test_a_lost_commit_whose_backend_lives_on_is_stored_once_and_answered_right(
        writers: list[Writer], database_url: str, with_ids: bool, expected: int | None,
) -> None:
    """The lost connection's backend, still waiting for the lock, would commit once it got
    it — after the writer had looked for the batch and retried it: the client heard a false
    conflict (expected version) or the writer retried forever (server-assigned ids, met
    again). The writer ends that backend first and looks once it has gone."""
    a, _ = writers
    stream = sid()
    await a.append(stream, events(1), expected=0)
    outcome = await _append_cut_behind_the_lock(a, database_url, stream,
                                                events(1, with_ids=with_ids), expected)
    assert isinstance(outcome, pb.AppendEventsResponse), outcome
    assert (outcome.next_expected_version, outcome.first_position) == (2, 2)
    assert [(p, v) for p, _, v in stored(database_url)] == [(1, 1), (2, 2)]
    reply = await a.append(stream, events(1), expected=2)  # the writer goes on
    assert reply.next_expected_version == 3


async def test_a_retry_whose_commit_is_lost_still_gets_the_original_result(
        writers: list[Writer], database_url: str) -> None:
    """A retry's ids are stored already (by the original append): finding them after a lost
    COMMIT does not mean that this attempt stored them. The writer looks for each request's
    first id at the position it planned for it, and the retry gets the original result."""
    a, _ = writers
    stream = sid()
    batch = events(2, with_ids=True)
    original = await a.append(stream, batch)
    outcome = await _append_cut_behind_the_lock(a, database_url, stream, batch, None)
    assert outcome == original
    assert [(p, v) for p, _, v in stored(database_url)] == [(1, 1), (2, 2)]


async def test_a_lost_commit_that_was_stored_is_answered_and_announced(
        nursery: trio.Nursery, database_url: str) -> None:
    """The COMMIT went through but its answer was lost: the writer finds the batch at the
    positions it planned, answers it as committed and tells its listeners (the live feed)."""
    metrics = Metrics()
    writer = AppendWriter(database_url, make_settings(database_url), metrics)
    announced: list[tuple[int, int, int]] = []
    writer.add_listener(lambda first, last, count, rows: announced.append((first, last, count)))
    finish = writer._finish
    lost = []

    def finish_then_lose(statement: object, results: object) -> None:
        if not lost:
            lost.append(True)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        finish(statement, results)  # type: ignore[arg-type]

    writer._finish = finish_then_lose  # type: ignore[method-assign]
    await nursery.start(writer.run)
    view = Writer(writer, metrics)
    stream = sid()
    reply = await view.append(stream, events(3))
    assert lost and (reply.first_position, reply.last_position) == (1, 3)
    assert [(p, v) for p, _, v in stored(database_url)] == [(1, 1), (2, 2), (3, 3)]
    assert announced == [(1, 3, 3)]
    assert (await view.append(stream, events(1), expected=3)).first_position == 4
    assert announced == [(1, 3, 3), (4, 4, 1)]


async def test_positions_stay_dense_under_a_repeatable_read_default(
        writers: list[Writer], database_url: str) -> None:
    """The writer reads the head in a statement after the one that takes the append lock,
    which sees the commits made meanwhile only under READ COMMITTED: its sessions ask for it
    whatever the database's default (under REPEATABLE READ two writers took the same
    positions, and their clients heard ALREADY_EXISTS)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET"
                     " default_transaction_isolation = ''repeatable read''',"
                     " current_database()); END $$")

    async def appends(writer: Writer) -> None:
        stream = sid()
        for _ in range(40):
            await writer.append(stream, events(1))

    async with trio.open_nursery() as nursery:
        for writer in writers:
            for _ in range(3):
                nursery.start_soon(appends, writer)
    assert [p for p, _, _ in stored(database_url)] == list(range(1, 241))


@pytest.mark.parametrize("size", [1, INSERT_MAX_EVENTS + 1], ids=["insert", "copy"])
async def test_text_is_stored_right_on_a_database_not_in_utf8(
        nursery: trio.Nursery, pg_cluster: PgCluster, size: int) -> None:
    """The sessions speak UTF-8 whatever the database's encoding: a binary COPY's text is
    read in the client's encoding (on a LATIN1 database "café" was stored as "cafÃ©" by COPY,
    and right by INSERT)."""
    from eventstore.db.migrations import apply_migrations

    name = f"es_latin1_{size}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_cluster.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1'"
                     " LC_COLLATE 'C' LC_CTYPE 'C'")
    url = pg_cluster.url_for(name)
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn)
    metrics = Metrics()
    writer = AppendWriter(url, make_settings(url), metrics)
    await nursery.start(writer.run)
    evs = [new_event("Créé", '{"name": "café"}'.encode()) for _ in range(size)]
    await Writer(writer, metrics).append(sid(), evs)
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT DISTINCT event_type, data->>'name' FROM events").fetchall()
    assert rows == [("Créé", "café")]


def test_connections_ask_tcp_to_notice_a_vanished_database_host(database_url: str) -> None:
    """A database host that vanishes without closing its connections must be noticed in
    seconds, not the system's hours: the writer's commit is never abandoned, so no append
    would be answered meanwhile. (The embedded cluster here listens on a Unix socket, where
    libpq ignores these; over TCP they become SO_KEEPALIVE, TCP_KEEPIDLE… on the socket.)"""
    from eventstore.db.connection import TCP_KEEPALIVES, connect

    with connect(database_url) as conn:
        parameters = conn.info.get_parameters()
    assert {k: int(parameters[k]) for k in TCP_KEEPALIVES} == TCP_KEEPALIVES
    assert TCP_KEEPALIVES["keepalives"] == 1
    assert TCP_KEEPALIVES["keepalives_idle"] + (
        TCP_KEEPALIVES["keepalives_interval"] * TCP_KEEPALIVES["keepalives_count"]) <= 60
