"""The append path: one writer task group-commits the requests of every client.

Handlers queue a parsed request (`AppendWriter.append`) and wait. The writer takes whatever
queued while its last transaction ran (up to the batch limits; no artificial delay) and commits
it in one transaction:

1. `pg_advisory_xact_lock(APPEND_LOCK_KEY)` — every writer of every server process on this
   database takes it, so appends are serialized and become visible in position order
   (PostgreSQL makes a transaction visible before it releases its locks). A reader that follows
   positions can therefore never be shown an event below one it has already seen.
2. the current head position (`max(position)`, read after the lock in a new statement, so it
   sees every earlier holder's commit);
3. the idempotency check by client event id (before the version check, as API.md says);
4. the current versions of the batch's streams, checked by the Rust extension request by
   request (a later request on the same stream sees the earlier ones);
5. the accepted events with dense positions: one binary COPY built by the Rust extension, or
   for a small batch one INSERT … VALUES whose text the extension writes;
6. the streams' new versions, NOTIFY (only while other server processes listen), COMMIT.

Steps 1-4 are one round trip, and steps 5-6 another (one query string; a COPY's rows are
streamed in the middle of it).

When the writer can tell the head position and the batch's streams' versions without asking
(it remembers what its own commits left, and a client that states an expected version is
usually right), steps 2-4 become a guard in the same query string as steps 5-6: the whole
transaction is one round trip. The guard (`eventstore_begin_append`, migration 003) aborts it
before anything is written when the store is not as expected (another server process appended,
or a guess was wrong); the batch is then committed the usual way, and after repeated misses the
writer stops guessing for a while. Such a commit of a small batch (an INSERT, no COPY) runs
from the event loop itself, Trio waiting on the connection's socket; everything else runs in a
worker thread (`_commit`), which also takes over whenever the loop's attempt fails.

Each request gets its own outcome: a conflict or a bad payload in one request never fails
another. A lost connection is retried on a new one; when it is lost during COMMIT the outcome is
reconciled by event id, so a client never hears a false success and nothing is written twice.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import trio
from psycopg import pq
from psycopg.rows import TupleRow

from eventstore._es_codec import AppendRequest, check_versions, encode_copy, insert_sql
from eventstore.config import Settings
from eventstore.db.connection import connect
from eventstore.db.errors import is_connection_error, is_data_error, result_error, to_domain
from eventstore.db.literals import Literal, bind
from eventstore.db.statements import exec_all, exec_all_in_loop
from eventstore.errors import (
    AlreadyExists,
    EventStoreError,
    Unavailable,
    WrongExpectedVersion,
)
from eventstore.metrics import Metrics
from eventstore.store.batching import (
    Retry,
    Reused,
    StoredEvent,
    classify_stored,
    guess_versions,
    take_batch,
)

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key shared by every appending transaction ("esap").
APPEND_LOCK_KEY = 0x65736170
# PostgreSQL timestamps count microseconds from 2000-01-01 UTC.
PG_EPOCH_OFFSET_US = 946_684_800_000_000

# The writer talks to PostgreSQL with one libpq call per round trip (multi-statement simple
# queries, parameters bound client-side): each call releases the GIL once, where psycopg's
# pipeline releases and re-acquires it for every step. With the event loop busy, every
# re-acquisition waits for it (up to the interpreter's switch interval): measured in
# isolation against a busy Python thread, 0.3 ms of round trip became 4-60 ms that way.
#
# BEGIN, the lock, then — in a later statement, so with a snapshot taken after the lock was
# granted — the head, the stored ids asked for, and the streams' versions.
_BEGIN = (
    "BEGIN; SELECT pg_advisory_xact_lock(%s);"
    " SELECT (SELECT coalesce(max(position), 0) FROM events),"
    " (SELECT json_agg(json_build_array(e.event_id, e.stream_id, e.stream_type, e.version,"
    " e.position)) FROM events e WHERE e.event_id = ANY(%s::uuid[])),"
    " (SELECT json_agg(json_build_array(s.stream_id, s.stream_type, s.version))"
    " FROM event_streams s JOIN unnest(%s::uuid[], %s::text[]) AS k(id, t)"
    " ON s.stream_id = k.id AND s.stream_type = k.t)"
)
# The one-round-trip commit's steps 1-4: BEGIN, then the lock and the guard that the head and
# the streams' versions are the ones the batch was decided on (migration 003: a function, so
# PostgreSQL plans its queries once per connection, not in every transaction).
_GUARDED_BEGIN = (
    "BEGIN; SELECT eventstore_begin_append(%s, %s, %s::uuid[], %s::text[], %s::int8[]);"
)
STALE_SQLSTATE = "ES001"
# How many versions the writer remembers, and how many batches it commits the usual way after
# a guess proved wrong (doubling while guesses keep failing).
KNOWN_VERSIONS_MAX = 65_536
GUESS_BACKOFF_MAX = 256
_STORED_IDS = (
    "SELECT event_id::text, stream_id::text, stream_type, version, position"
    " FROM events WHERE event_id = ANY(%s::uuid[])"
)
# Small batches' events go in the COMMIT's round trip, as one INSERT … VALUES whose text the
# Rust extension writes (`insert_sql`); larger ones by binary COPY, in the same query string.
INSERT_MAX_EVENTS = 64
INSERT_MAX_BYTES = 256 * 1024
# The largest batch the event loop commits itself (encoding a COPY holds the loop: about
# 0.3 ms per 1,000 events); larger ones go to the worker thread.
LOOP_MAX_EVENTS = 2_000
LOOP_MAX_BYTES = 1024 * 1024
# The streams' new versions (migration 003), the wake-up of other server processes' live
# feeds when there are any (`eventstore.store.peers`; once per batch, not per request: a NOTIFY
# in every transaction serializes commits cluster-wide), and COMMIT — with, while someone
# subscribes, the committed rows read back (`_ROWS`) so that this process's live feed need not
# read them again.
_FINISH = "SELECT eventstore_finish_append(%s::uuid[], %s::text[], %s::int8[], %s);"
_NOTIFY = " NOTIFY eventstore_commits;"
# Rows between two positions as the tuples of `COPY … TO STDOUT (FORMAT BINARY)` — the very
# bytes the readers get, which the Rust extension turns into Events (*_send are the binary
# output functions COPY uses) — in one value, inside the transaction (its own rows).
_ROWS = (
    " SELECT string_agg('\\x0009'::bytea"
    " || int4send(16) || uuid_send(event_id) || int4send(16) || uuid_send(stream_id)"
    " || int4send(octet_length(textsend(stream_type))) || textsend(stream_type)"
    " || int4send(8) || int8send(version)"
    " || int4send(octet_length(textsend(event_type))) || textsend(event_type)"
    " || int4send(octet_length(jsonb_send(data))) || jsonb_send(data)"
    " || CASE WHEN metadata IS NULL THEN int4send(-1)"
    " ELSE int4send(octet_length(jsonb_send(metadata))) || jsonb_send(metadata) END"
    " || int4send(8) || timestamptz_send(created_at) || int4send(8) || int8send(position),"
    " ''::bytea ORDER BY position) FROM events WHERE position BETWEEN %s AND %s;"
)
_COMMIT = " COMMIT"
READ_BACK_MAX_EVENTS = 256
READ_BACK_MAX_BYTES = 256 * 1024
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
COPY_TRAILER = b"\xff\xff"
COPY_EVENTS = (
    "COPY events (event_id, stream_id, stream_type, version, event_type, data, metadata,"
    " created_at, position) FROM STDIN (FORMAT BINARY);"
)

Outcome = bytes | EventStoreError
# (first position, last position, event count, the committed rows as binary COPY output, or
# None when they were not read back)
BatchListener = Callable[[int, int, int, bytes | None], None]


class PendingAppend:
    """A queued request and, once the writer is done with it, its outcome; `resolve` wakes
    the task that waits for it (`AppendWriter.append`)."""

    __slots__ = ("outcome", "request", "waiter")

    def __init__(self, request: AppendRequest) -> None:
        self.request = request
        self.outcome: Outcome | None = None
        self.waiter: trio.lowlevel.Task | None = None

    def resolve(self, outcome: Outcome) -> None:
        self.outcome = outcome
        if self.waiter is not None:
            trio.lowlevel.reschedule(self.waiter)
            self.waiter = None

    @property
    def event_count(self) -> int:
        return self.request.event_count

    @property
    def payload_bytes(self) -> int:
        return self.request.payload_bytes

    @property
    def client_event_ids(self) -> list[str]:
        return self.request.client_event_ids


class _OutcomeUnknown(Exception):
    """The connection broke during COMMIT: the batch may or may not be stored."""

    def __init__(self, statement: _Statement) -> None:
        super().__init__("commit outcome unknown")
        self.statement = statement


class _BackendLives(Exception):
    """The backend of a lost writer connection has not ended yet."""


class _StoredIdsMet(Exception):
    """The COPY met an event id that is already stored."""


class _Stale(Exception):
    """The one-round-trip commit's guard found the store not as the writer expected."""


@dataclass(slots=True)
class _Statement:
    """One commit's query string, and what its answer means."""

    conn: psycopg.Connection[TupleRow]
    text: str
    copy: bytes | None  # the input of the query's COPY FROM STDIN, if it has one
    want_rows: bool  # the committed rows are read back (the result before COMMIT's)
    planned: list[Outcome]  # every request's outcome, once committed
    # The first event id of each stored request and the position it would have: a lost
    # COMMIT's batch is stored if these are (the id alone may be stored already: a retry).
    probe_ids: list[str]
    probe_positions: list[int]
    head: int
    count: int
    final: dict[tuple[str, str], int]  # the streams' versions after it


def _keys(requests: Sequence[AppendRequest]) -> dict[tuple[str, str], int]:
    """Each distinct stream of `requests`, numbered in order of appearance."""
    keys: dict[tuple[str, str], int] = {}
    for request in requests:
        keys.setdefault((request.stream_id, request.stream_type), len(keys))
    return keys


def _small(requests: Sequence[AppendRequest], max_events: int = INSERT_MAX_EVENTS,
           max_bytes: int = INSERT_MAX_BYTES) -> bool:
    """Whether `requests`' events go in by INSERT (else by COPY), or with other limits,
    whether they are within those."""
    return (sum(request.event_count for request in requests) <= max_events
            and sum(request.payload_bytes for request in requests) <= max_bytes)


class AppendWriter:
    """Owns the writer connection and the queue; `run` is the writer task."""

    def __init__(self, url: str, settings: Settings, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._url = url
        self._settings = settings
        self._queue: deque[PendingAppend] = deque()
        self._has_work = trio.Event()
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._backend_pid: int | None = None
        # The writer connection's backend as pg_stat_activity names it (pid, backend_start):
        # a pid alone may be another session's by the time it is looked for.
        self._backend: tuple[int, datetime] | None = None
        self._accepting = True
        self._refusal = ("the server is shutting down; nothing was written, retry on another "
                         "server")
        self._busy = False
        self._batch_done = trio.Event()
        self._listeners: list[BatchListener] = []
        # Ranges committed (by the worker thread or the loop's attempt), announced by the
        # writer task.
        self._committed: list[tuple[int, int, int, bytes | None]] = []
        # Whether to read committed rows back for the listeners (asked once per batch).
        self.rows_wanted: Callable[[], bool] = lambda: False
        # Whether other server processes listen for commits (asked once per batch).
        self.notify_peers: Callable[[], bool] = lambda: True
        # What the writer last saw of the store (for the one-round-trip commit): the head
        # position (None: unknown), streams' versions (oldest first), and the guessing backoff.
        self._head: int | None = None
        self._known: dict[tuple[str, str], int] = {}
        self._skip_guesses = 0
        self._guess_backoff = 1

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend pid of the writer connection (its NOTIFYs carry it)."""
        return self._backend_pid

    def add_listener(self, listener: BatchListener) -> None:
        """Call `listener(first_position, last_position, event_count, rows)` after each commit
        that stored events (from the writer task, not a thread); `rows` is the committed events
        as binary COPY output when `rows_wanted()` said so, else None."""
        self._listeners.append(listener)

    async def append(self, request: AppendRequest) -> bytes:
        """Queue `request` and wait for its outcome: the serialized AppendEventsResponse, or a
        domain error.

        Once queued, the request is committed whatever becomes of the caller, so the wait is
        not cancellable (a cancellation is delivered at the caller's next checkpoint): the
        caller always learns the outcome — a stored write always gets its audit line. The
        writer answers every queued request, at the latest after `writer_retry_seconds` or
        when it stops. (Not an Event in a shielded scope: a cancel scope costs some 10 µs in
        Trio, a tenth of an append's own work in the server at batch 1.)"""
        if not self._accepting:
            raise Unavailable(self._refusal)
        pending = PendingAppend(request)
        pending.waiter = trio.lowlevel.current_task()
        self._queue.append(pending)
        self._has_work.set()
        await trio.lowlevel.wait_task_rescheduled(_not_abortable)
        outcome = pending.outcome
        if isinstance(outcome, bytes):
            return outcome
        assert outcome is not None
        raise outcome

    def refuse_writes(self, reason: str) -> None:
        """Answer every append UNAVAILABLE with `reason` (a server of a read replica)."""
        self._accepting = False
        self._refusal = reason

    async def drain(self) -> None:
        """Refuse new appends (UNAVAILABLE) and return once everything already queued has been
        committed and answered. The caller bounds the wait."""
        self._accepting = False
        while self._queue or self._busy:
            await self._batch_done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Cancelling it fails queued requests with UNAVAILABLE, but a batch
        already being committed is finished first (a COMMIT is never abandoned)."""
        task_status.started()
        try:
            while True:
                if not self._queue:
                    self._has_work = trio.Event()
                    await self._has_work.wait()
                    continue
                batch = take_batch(
                    self._queue,
                    self._settings.writer_max_batch_events,
                    self._settings.writer_max_batch_bytes,
                )
                started = time.perf_counter()
                self._busy = True
                try:
                    with trio.CancelScope(shield=True):
                        outcomes = await self._commit_batch(batch)
                except BaseException:
                    # A bug, not an outage (those are answered by `_commit`): every request
                    # still gets an answer, as its handler waits for one whatever happens.
                    self._resolve(batch, [Unavailable(
                        "the append failed inside the server; it may be stored: retry with the "
                        "same event ids to learn its outcome")] * len(batch))
                    raise
                self._busy = False
                self._resolve(batch, outcomes)
                self._batch_done.set()
                self._batch_done = trio.Event()
                if self._metrics is not None:
                    self._observe(self._metrics, batch, outcomes, time.perf_counter() - started)
                committed, self._committed = self._committed, []
                for first, last, count, rows in committed:
                    for listener in self._listeners:
                        try:
                            listener(first, last, count, rows)
                        except Exception:
                            # A listener's bug must not stop the appends of every client.
                            log.exception("a commit listener failed")
        finally:
            self._accepting = False
            while self._queue:
                self._queue.popleft().resolve(Unavailable("the server is shutting down; retry"))
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def _commit_batch(self, batch: Sequence[PendingAppend]) -> list[Outcome]:
        """Commit `batch` (the caller shields this: a COMMIT is never abandoned).

        A batch the writer can guess for, up to `LOOP_MAX_EVENTS` and `LOOP_MAX_BYTES`, is
        committed from the event loop itself, with the connection's socket waited on by Trio:
        its one round trip then costs no thread hand-off either way. Everything else — a
        larger COPY, the usual two round trips, retries and recovery from any failure of the
        loop's attempt — runs in a worker thread."""
        guess = self._guess_turn()
        failure: Exception | None = None
        if guess and _small([pending.request for pending in batch], LOOP_MAX_EVENTS,
                            LOOP_MAX_BYTES):
            guess = False  # whatever happens here, the thread does not guess this batch again
            statement: _Statement | None = None
            try:
                statement = self._guessed_statement(batch)
                if statement is not None:
                    results = await exec_all_in_loop(statement.conn, statement.text,
                                                      statement.copy)
                    self._finish(statement, results)
                    self._hit()
                    return statement.planned
            except Exception as exc:
                failure = exc if statement is None else self._translated(exc, statement)
        return await trio.to_thread.run_sync(self._commit, batch, failure, guess)

    @staticmethod
    def _observe(metrics: Metrics, batch: Sequence[PendingAppend], outcomes: Sequence[Outcome],
                 seconds: float) -> None:
        metrics.commit_seconds.observe(seconds)
        metrics.batch_requests.observe(len(batch))
        ok = sum(1 for outcome in outcomes if isinstance(outcome, bytes))
        if ok:
            metrics.append_requests.labels("ok").inc(ok)
        if ok < len(outcomes):
            for outcome in outcomes:
                if not isinstance(outcome, bytes):
                    metrics.append_requests.labels(type(outcome).__name__).inc()

    def _resolve(self, batch: Sequence[PendingAppend], outcomes: Sequence[Outcome]) -> None:
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.resolve(outcome)

    # -- in the worker thread -------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[TupleRow]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(
                self._url,
                statement_timeout_ms=self._settings.statement_timeout_ms,
                prepare=False,
            )
            self._backend_pid = self._conn.info.backend_pid
            self._backend = None
            try:
                row = self._conn.execute("SELECT pid, backend_start FROM pg_stat_activity"
                                         " WHERE pid = pg_backend_pid()").fetchone()
                self._conn.rollback()
            except Exception:
                # Not a connection to commit on without knowing its backend (see _reconcile).
                self._drop_connection()
                raise
            if row is not None and row[1] is not None:
                self._backend = (int(row[0]), row[1])
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing a broken writer connection failed", exc_info=True)
            self._conn = None

    def _rollback(self) -> None:
        if self._conn is not None:
            if self._conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
                # A query still running (an attempt that failed half-way): start afresh.
                self._drop_connection()
                return
            try:
                self._conn.rollback()
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._drop_connection()

    def _commit(self, batch: Sequence[PendingAppend], failed: Exception | None = None,
                guess: bool = False) -> list[Outcome]:
        """Commit `batch`, retrying on a new connection until `writer_retry_seconds` pass.
        `failed`: how the event loop's attempt at it failed, handled here as if this thread's
        own attempt had. `guess`: try the one-round-trip commit first."""
        deadline = time.monotonic() + self._settings.writer_retry_seconds
        delay = 0.05
        check_all_ids = False
        while True:
            try:
                if failed is not None:
                    exc, failed = failed, None
                    raise exc
                return self._commit_once(self._connection(), batch,
                                         check_all_ids=check_all_ids, guess=guess)
            except _Stale:
                self._rollback()
                self._missed()
                continue
            except _StoredIdsMet:
                # An accepted request carried an id that is already stored (a retry, or a
                # reuse): run the batch again with every client id looked up first.
                self._rollback()
                if check_all_ids:
                    # Every client id was looked up: a server-assigned id is stored. Never
                    # seen; not retried forever (this work holds up every append).
                    log.error("an event id the server assigned is already stored")
                    return [Unavailable("the append could not be stored (an assigned event "
                                        "id collided); retry")] * len(batch)
                check_all_ids = True
                continue
            except _OutcomeUnknown as unknown:
                lost_backend = self._backend
                self._drop_connection()
                reconciled = self._reconcile(unknown, deadline, lost_backend)
                if reconciled is not None:
                    return reconciled
                log.warning("commit lost with its connection; retrying the batch")
            except Exception as exc:
                if is_connection_error(exc):
                    log.warning("writer lost its database connection: %s", exc)
                    self._drop_connection()
                elif is_data_error(exc) and len(batch) > 1:
                    # One request carried a value PostgreSQL refuses: find it by committing
                    # each request alone, so the others still succeed.
                    self._rollback()
                    return [outcome for one in batch for outcome in self._commit([one])]
                else:
                    self._rollback()
                    return [to_domain(exc, what="appending events")] * len(batch)
            if time.monotonic() >= deadline:
                down = Unavailable("database unavailable; nothing was written, retry later")
                return [down] * len(batch)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _reconcile(self, unknown: _OutcomeUnknown, deadline: float,
                   lost_backend: tuple[int, datetime] | None) -> list[Outcome] | None:
        """After a COMMIT whose outcome is unknown: the planned outcomes if the batch is stored,
        None if it is not (then it is simply retried), UNAVAILABLE if we cannot tell.

        The lost connection's backend may live on (the network failed, not the database) and
        still commit, e.g. once it gets the append lock: it is ended first, and the batch
        looked for once it has gone, when its outcome is final. The batch is stored if each
        request's first event id is at the position planned for it: the id alone may have been
        stored by an earlier append (the batch was a retry, which must get the original
        result, not this attempt's)."""
        statement = unknown.statement
        delay = 0.05
        while True:
            try:
                conn = self._connection()
                if lost_backend is not None and lost_backend != self._backend:
                    if not self._ended(conn, lost_backend):
                        raise _BackendLives()
                    lost_backend = None
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM events e JOIN unnest(%s::uuid[], %s::int8[])"
                        " AS p(id, position) ON e.event_id = p.id AND e.position = p.position",
                        (statement.probe_ids, statement.probe_positions),
                    )
                    row = cur.fetchone()
                conn.rollback()
                stored = row[0] if row else 0
                if stored == len(statement.probe_ids):
                    log.warning("commit outcome was unknown; the batch is stored")
                    self._stored(statement, None)
                    return statement.planned
                if stored:
                    log.error("commit partially visible (%d of %d); answering UNAVAILABLE",
                              stored, len(statement.probe_ids))
                    break
                return None
            except _BackendLives:
                pass
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("reconciling an unknown commit failed")
                    break
                self._drop_connection()
            if time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        unknown_outcome = Unavailable(
            "database connection lost while committing; the append may be stored: "
            "retry with the same event ids to learn its outcome"
        )
        return [
            unknown_outcome if isinstance(planned, bytes) else planned
            for planned in statement.planned
        ]

    @staticmethod
    def _ended(conn: psycopg.Connection[TupleRow], backend: tuple[int, datetime]) -> bool:
        """Ask the backend of a lost connection to end (aborting what it has not committed);
        whether it has gone. Without the right to end it (another role's backend), it is only
        waited for: looking for the batch while it may still commit could answer wrong."""
        pid, started = backend
        with conn.cursor() as cur:
            try:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE pid = %s AND backend_start = %s", (pid, started))
            except psycopg.errors.InsufficientPrivilege:
                conn.rollback()
                log.warning("cannot end the lost writer connection's backend %d; waiting for"
                            " it to end", pid)
                cur.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s"
                            " AND backend_start = %s", (pid, started))
            ended = cur.fetchone() is None
        conn.rollback()
        return ended

    def _commit_once(self, conn: psycopg.Connection[TupleRow], batch: Sequence[PendingAppend],
                     *, check_all_ids: bool, guess: bool = False) -> list[Outcome]:
        """One attempt at committing `batch`.

        Idempotency costs nothing on the common path: client ids are looked up first only when
        `check_all_ids`; otherwise only for requests that fail the version check (a retry with
        a stale expected version must still be answered as a retry), and the unique index on
        event_id catches any other stored id during the insert (`_StoredIdsMet`: the caller
        then retries with `check_all_ids`). Either way a request's ids are checked before its
        expected version decides, as API.md requires.
        """
        requests = [pending.request for pending in batch]
        if guess and not check_all_ids:
            statement = self._guessed_statement(batch, conn)
            if statement is not None:
                try:
                    self._execute(statement)
                except _Stale:
                    self._rollback()
                    self._missed()
                else:
                    self._hit()
                    return statement.planned
        keys = _keys(requests)
        client_ids = (
            [event_id for request in requests for event_id in request.client_event_ids]
            if check_all_ids else []
        )
        result = _exec(conn, _bind(_BEGIN, (APPEND_LOCK_KEY, client_ids,
                                            [k[0] for k in keys], [k[1] for k in keys])))
        head = int(result.get_value(0, 0) or 0)
        stored_rows = _json_rows(result.get_value(0, 1))
        version_rows = _json_rows(result.get_value(0, 2))
        current = [0] * len(keys)
        for stream_id, stream_type, version in version_rows:
            current[keys[(stream_id, stream_type)]] = int(version)
        self._head = head
        self._remember(zip(keys, current, strict=True))

        outcomes: list[Outcome | None] = [None] * len(requests)
        if stored_rows:
            self._check_retries(conn, requests, outcomes,
                                {row[0]: StoredEvent(*row) for row in stored_rows})
        live = [i for i, outcome in enumerate(outcomes) if outcome is None]
        accepted, conflicted = self._decide(requests, keys, current, head, live, outcomes)
        conflicted = [i for i in conflicted if requests[i].has_client_ids and not check_all_ids]
        if conflicted:
            # A conflict may be a retry whose expected version is stale: ids decide first.
            ids = [e for i in conflicted for e in requests[i].client_event_ids]
            rows = conn.execute(_STORED_IDS, (ids,)).fetchall()
            if rows:
                self._check_retries(conn, requests, outcomes,
                                    {row[0]: StoredEvent(*row) for row in rows},
                                    only=conflicted)
        planned = [outcome for outcome in outcomes if outcome is not None]
        assert len(planned) == len(requests)
        if not accepted:
            conn.rollback()
            return planned
        self._execute(self._statement(conn, accepted, planned, head, "", ()))
        return planned

    def _guess_turn(self) -> bool:
        """Whether to try the one-round-trip commit for the next batch (not for a while after
        a miss)."""
        if self._skip_guesses:
            self._skip_guesses -= 1
            return False
        return True

    def _hit(self) -> None:
        self._guess_backoff = 1
        if self._metrics is not None:
            self._metrics.append_guesses.labels("hit").inc()

    def _missed(self) -> None:
        """A guess proved wrong: commit the next batches the usual way (more of them after each
        miss in a row, so a store that another server process keeps appending to is not paid
        a wasted round trip per batch)."""
        if self._metrics is not None:
            self._metrics.append_guesses.labels("miss").inc()
        self._head = None
        self._skip_guesses = self._guess_backoff
        self._guess_backoff = min(self._guess_backoff * 2, GUESS_BACKOFF_MAX)

    def _remember(self, versions: Iterable[tuple[tuple[str, str], int]]) -> None:
        known = self._known
        for key, version in versions:
            known.pop(key, None)
            known[key] = version
        while len(known) > KNOWN_VERSIONS_MAX:
            del known[next(iter(known))]

    def _guessed_statement(self, batch: Sequence[PendingAppend],
                           conn: psycopg.Connection[TupleRow] | None = None,
                           ) -> _Statement | None:
        """The one-round-trip commit of `batch`, decided on the head and versions the writer
        expects (on `conn`, else on the current connection when it is idle); None when it
        cannot tell them, or when a request would not be accepted on them (a conflict must be
        confirmed, and may be an idempotent retry)."""
        if conn is None:
            conn = self._conn
            if (conn is None or conn.closed
                    or conn.pgconn.transaction_status != pq.TransactionStatus.IDLE):
                return None
        if self._head is None:
            return None
        head = self._head
        requests = [pending.request for pending in batch]
        keys = _keys(requests)
        current = guess_versions(keys, requests, self._known)
        if current is None:
            return None
        outcomes: list[Outcome | None] = [None] * len(requests)
        accepted, conflicted = self._decide(requests, keys, current, head,
                                            list(range(len(requests))), outcomes)
        if conflicted:
            return None
        planned = [outcome for outcome in outcomes if outcome is not None]
        guard = (APPEND_LOCK_KEY, head, [k[0] for k in keys], [k[1] for k in keys], current)
        return self._statement(conn, accepted, planned, head, _GUARDED_BEGIN, guard)

    def _decide(self, requests: Sequence[AppendRequest], keys: dict[tuple[str, str], int],
                current: list[int], head: int, live: list[int], outcomes: list[Outcome | None],
                ) -> tuple[list[tuple[AppendRequest, int]], list[int]]:
        """Decide the `live` requests on the streams' `current` versions: the outcome of
        each (its reply, or WrongExpectedVersion) goes in `outcomes`. Returns the accepted
        requests with their first versions, in position order from `head` + 1, and the
        indexes of the conflicting ones."""
        accepted: list[tuple[AppendRequest, int]] = []
        conflicted: list[int] = []
        if not live:
            return accepted, conflicted
        firsts = check_versions(
            current,
            [keys[(requests[i].stream_id, requests[i].stream_type)] for i in live],
            [requests[i].expected_version for i in live],
            [requests[i].event_count for i in live],
        )
        threshold = self._settings.snapshot_threshold
        position = head + 1
        for i, first in zip(live, firsts, strict=True):
            request = requests[i]
            if first < 0:
                expected = request.expected_version
                assert expected is not None
                outcomes[i] = WrongExpectedVersion(expected, -first - 1)
                conflicted.append(i)
                continue
            outcomes[i] = request.response(first, position, threshold)
            accepted.append((request, first))
            position += request.event_count
        return accepted, conflicted

    def _statement(self, conn: psycopg.Connection[TupleRow],
                   accepted: Sequence[tuple[AppendRequest, int]], planned: list[Outcome],
                   head: int, begin: str, begin_params: tuple[Literal, ...]) -> _Statement:
        """The query string that stores the `accepted` requests at positions from `head` + 1
        and commits, after `begin` (the one-round-trip commit's first steps, or nothing when
        the transaction is already open)."""
        now_us = time.time_ns() // 1000
        now = datetime.fromtimestamp(now_us / 1_000_000, tz=UTC)
        requests = [request for request, _ in accepted]
        firsts = [first for _, first in accepted]
        count = sum(request.event_count for request in requests)
        small = _small(requests)
        final: dict[tuple[str, str], int] = {}
        for request, first in accepted:
            key = (request.stream_id, request.stream_type)
            final[key] = max(final.get(key, 0), first + request.event_count - 1)
        # Read back only small batches: the read runs under the append lock.
        want_rows = (_small(requests, READ_BACK_MAX_EVENTS, READ_BACK_MAX_BYTES)
                     and self.rows_wanted())
        insert = insert_sql(requests, firsts, head + 1, now.isoformat()) if small else (
            COPY_EVENTS)
        text = _bind(begin, begin_params) + insert + _bind(
            _FINISH + (_NOTIFY if self.notify_peers() else "") + (_ROWS if want_rows else "")
            + _COMMIT,
            ([k[0] for k in final], [k[1] for k in final], list(final.values()), now)
            + ((head + 1, head + count) if want_rows else ()))
        return _Statement(
            conn=conn, text=text,
            copy=None if small else encode_copy(requests, firsts, head + 1,
                                                now_us - PG_EPOCH_OFFSET_US),
            want_rows=want_rows, planned=planned,
            probe_ids=[request.event_ids[0] for request in requests],
            probe_positions=list(itertools.accumulate(
                (request.event_count for request in requests[:-1]), initial=head + 1)),
            head=head, count=count, final=final)

    def _execute(self, statement: _Statement) -> None:
        """Run `statement` (in the worker thread), then `_finish` it."""
        try:
            # Every statement's result only when needed (a COPY's input is sent in the middle,
            # or the read-back is wanted): PQexec waits for them all in one GIL release.
            if statement.copy is not None or statement.want_rows:
                results = exec_all(statement.conn, statement.text, statement.copy)
            else:
                results = [_exec(statement.conn, statement.text)]
            self._finish(statement, results)
        except Exception as exc:
            translated = self._translated(exc, statement)
            if translated is exc:
                raise
            raise translated from exc

    @staticmethod
    def _translated(exc: Exception, statement: _Statement) -> Exception:
        """What a failure of `statement` means to `_commit`."""
        if isinstance(exc, psycopg.errors.UniqueViolation):
            if exc.diag.constraint_name == "events_pkey":
                return _StoredIdsMet()
        elif isinstance(exc, psycopg.Error):
            if exc.sqlstate == STALE_SQLSTATE:
                return _Stale()
            if is_connection_error(exc):
                return _OutcomeUnknown(statement)
        return exc

    def _finish(self, statement: _Statement, results: list[pq.abc.PGresult]) -> None:
        """After `statement` answered: make sure it committed, and note what it stored."""
        if results[-1].command_status != b"COMMIT":
            # Not an error, yet not committed: never answer as if it were either way.
            raise psycopg.OperationalError(f"COMMIT answered {results[-1].command_status!r}")
        read_back = None
        if statement.want_rows:
            # A simple query's results are text: bytea comes as \x and hex digits.
            body = results[-2].get_value(0, 0)
            read_back = COPY_HEADER + (bytes.fromhex(body[2:].decode()) if body else b"") + (
                COPY_TRAILER)
        self._stored(statement, read_back)

    def _stored(self, statement: _Statement, read_back: bytes | None) -> None:
        """Note what `statement` committed, for the next guesses and the listeners."""
        head, count = statement.head, statement.count
        self._head = head + count
        self._remember(statement.final.items())
        self._committed.append((head + 1, head + count, count, read_back))

    def _check_retries(self, conn: psycopg.Connection[TupleRow],
                       requests: Sequence[AppendRequest], outcomes: list[Outcome | None],
                       stored: dict[str, StoredEvent], only: list[int] | None = None) -> None:
        """Set the outcome of each request (of `only`, if given) that is an idempotent retry
        or reuses ids."""
        candidates: list[tuple[int, Retry]] = []
        for i in range(len(requests)) if only is None else only:
            request = requests[i]
            if not request.has_client_ids:
                continue
            verdict = classify_stored(
                request.event_ids, request.stream_id, request.stream_type, stored
            )
            if isinstance(verdict, Reused):
                outcomes[i] = AlreadyExists(verdict.message)
            elif isinstance(verdict, Retry):
                candidates.append((i, verdict))
        if not candidates:
            return
        # Same ids, same places: a retry only if types and payloads are equal as JSON values.
        ids, types, datas, metas, owners = [], [], [], [], []
        for i, _ in candidates:
            request = requests[i]
            for j, event_id in enumerate(request.event_ids):
                metadata = request.event_metadata(j)
                ids.append(event_id)
                types.append(request.event_type(j))
                datas.append(request.event_data(j).decode())
                metas.append(metadata.decode() if metadata is not None else None)
                owners.append(i)
        cur = conn.execute(
            "SELECT k.owner, bool_and(e.event_type = k.t AND e.data = k.d::jsonb"
            " AND e.metadata IS NOT DISTINCT FROM k.m::jsonb)"
            " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::int4[])"
            " AS k(id, t, d, m, owner) JOIN events e ON e.event_id = k.id GROUP BY k.owner",
            (ids, types, datas, metas, owners),
        )
        same: dict[int, bool] = dict(cur.fetchall())
        threshold = self._settings.snapshot_threshold
        for i, retry in candidates:
            request = requests[i]
            if same.get(i):
                outcomes[i] = request.response(retry.first_version, retry.first_position, threshold)
            else:
                outcomes[i] = AlreadyExists(
                    f"event id {request.event_ids[0]} is already stored with a different "
                    "event type, data or metadata"
                )


def _not_abortable(raise_cancel: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


def _bind(query: str, params: tuple[Literal, ...]) -> str:
    """`query` with its parameters bound client-side (as SQL literals)."""
    return bind(query, params) if query else ""


def _exec(conn: psycopg.Connection[TupleRow], text: str) -> pq.abc.PGresult:
    """Run `text` (one or more statements, parameters bound) in one libpq call; the last
    statement's result. Errors are psycopg's (a lost connection: OperationalError)."""
    result = conn.pgconn.exec_(text.encode(conn.info.encoding))
    if result.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        raise result_error(conn, result)
    return result


def _json_rows(value: bytes | None) -> list[list[Any]]:
    """The rows of a json_agg(json_build_array(...)) column (NULL: none)."""
    return orjson.loads(value) if value else []
