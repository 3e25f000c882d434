"""The read path: GetEvents and ReadAll.

Rows leave PostgreSQL as binary COPY and the Rust extension turns them straight into the
serialized `Event` messages of the reply, so no Python object is built per event.

Reads run in autocommit (no BEGIN/ROLLBACK round trips) and still agree with themselves: a read
first takes a bound — the stream's version, or the head position — and then reads only up to
it. Everything up to a stream's version is committed (they are written in one transaction), and
everything up to the head position is committed (positions become visible in order: see
docs/design/global-order.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import outcome
import psycopg
import trio
from prometheus_client import Counter
from psycopg import pq, sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from eventstore._es_codec import encode_event_list, encode_events
from eventstore.config import Settings
from eventstore.db import libpq
from eventstore.db.connection import APPLICATION_NAME, SESSION_OPTIONS, keepalives_for
from eventstore.db.errors import is_connection_error, result_error, to_domain
from eventstore.metrics import Metrics
from eventstore.store.live import LiveEvent, Selector
from eventstore.store.snapshots import latest_snapshot, snapshot_message
from eventstore.store.validation import (
    EventFilter,
    PositionRange,
    StreamRange,
    like_pattern,
    like_prefix,
)
from eventstore.v1 import eventstore_pb2 as pb

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Conn = psycopg.Connection[TupleRow]

EVENT_COLUMNS = (
    "event_id, stream_id, stream_type, version, event_type, data, metadata, created_at, position"
)


# GetEvents without a snapshot (`Reader._get_events_at_once`): the stream's events up to the
# version its row has in the same snapshot (LEAST ignores a NULL upper bound: none asked for).
_STREAM_EVENTS_UP_TO_ITS_VERSION = (
    f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = %s AND stream_type = %s"
    " AND version >= %s AND version <= LEAST(%s::int8, (SELECT version FROM event_streams"
    " WHERE stream_id = %s AND stream_type = %s)) ORDER BY version LIMIT %s"
)


# Read-ahead: a client paging through a stream (GetEvents) or the whole store (ReadAll) asks
# for the next page as soon as it has read this one, so the next page is read while this one
# travels. A GetEvents page read ahead is served only after a check that the stream's version
# is still the one it was read at, and a ReadAll page only if it was a full one (see
# `Reader.read_all`): then a fresh read would return exactly the same reply. Of each kind, at
# most this many wait, each for at most this long.
PREFETCH_MAX = 16
PREFETCH_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class PositionsPage:
    """A serialized ReadAllResponse, and the next page's query position when it has more."""

    reply: bytes
    next_after: int | None


@dataclass(frozen=True, slots=True)
class EventsPage:
    """A serialized GetEventsResponse and what it was read at."""

    reply: bytes
    stream_version: int
    next_from: int | None  # the next page's from_version, when there is more


def _configure(conn: Conn) -> None:
    conn.autocommit = True


class Pending(Generic[_T]):
    """The result of a read begun in the background (`Reader._start`)."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._result: outcome.Outcome[_T] | None = None

    def set(self, result: outcome.Outcome[_T]) -> None:
        self._result = result
        self._done.set()

    async def result(self) -> _T:
        await self._done.wait()
        assert self._result is not None
        return self._result.unwrap()


_K = TypeVar("_K")


class ReadAhead(Generic[_K, _T]):
    """Reads begun ahead of the request that will want them, by that request's query: at most
    `PREFETCH_MAX`; one older than `PREFETCH_SECONDS` is dropped when the next one starts.
    `counter` (by outcome) is told what became of each: `unused` and `failed` here, the rest
    by the caller (`count`)."""

    def __init__(self, counter: Counter | None) -> None:
        self._waiting: dict[_K, tuple[float, Pending[_T]]] = {}
        self._counter = counter

    def count(self, outcome: str) -> None:
        if self._counter is not None:
            self._counter.labels(outcome).inc()

    async def take(self, key: _K) -> _T | None:
        """The result of the read begun for `key`, waited for if it still runs; None when
        there is none, or it failed."""
        entry = self._waiting.pop(key, None)
        if entry is None:
            return None
        try:
            return await entry[1].result()
        except Exception:
            self.count("failed")
            return None

    def put(self, key: _K, pending: Pending[_T]) -> None:
        now = time.monotonic()
        waiting = self._waiting
        for old, (started, _) in list(waiting.items()):
            if now - started > PREFETCH_SECONDS or len(waiting) >= PREFETCH_MAX:
                del waiting[old]
                self.count("unused")
        if waiting.pop(key, None) is not None:
            self.count("unused")
        waiting[key] = (now, pending)


@dataclass(frozen=True, slots=True)
class BatchPage:
    """Selected events as a serialized EventBatch body, and where the read got to."""

    body: bytes
    count: int
    last_version: int
    reached: int
    more: bool


class Reader:
    """Reads through a pool of connections, each use in a worker thread."""

    def __init__(self, url: str, settings: Settings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._prefetched: ReadAhead[StreamRange, EventsPage] = ReadAhead(
            metrics.get_events_prefetch if metrics is not None else None)
        self._read_ahead: ReadAhead[PositionRange, PositionsPage] = ReadAhead(
            metrics.read_all_prefetch if metrics is not None else None)
        # Every read here is an index walk in key order. Before autovacuum has analyzed a
        # freshly loaded table the planner can choose a bitmap scan plus a sort of the whole
        # range for each page (measured: catch-up 6x slower until ANALYZE); forbidding those
        # plans for these sessions keeps reads on the index whatever the statistics say.
        options = (f"{SESSION_OPTIONS} -c statement_timeout={settings.statement_timeout_ms}"
                   " -c default_transaction_read_only=on"
                   " -c enable_seqscan=off -c enable_bitmapscan=off -c enable_sort=off")
        self._url = url
        self._connect_kwargs: dict[str, object] = {
            "application_name": APPLICATION_NAME, "options": options, "connect_timeout": 5,
            **keepalives_for(url)}
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            url,
            min_size=1,
            max_size=settings.db_pool_size,
            kwargs=self._connect_kwargs,
            configure=_configure,
            open=False,
            name="eventstore-readers",
        )
        self._limiter = trio.CapacityLimiter(settings.db_pool_size)

    def open(self) -> None:
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close()

    def _attempt(self, what: str, work: Callable[[Conn], _T]) -> _T:
        """Run `work` on a pooled connection (in a worker thread); translate database errors at
        the seam.

        After a database restart every pooled connection is broken; the pool discards each one
        that fails, so a read retries (reads are idempotent) until it gets a working connection
        or a fresh one fails too."""
        def direct(pool_error: Exception) -> _T:
            try:
                conn = psycopg.connect(self._url, **self._connect_kwargs)  # type: ignore[arg-type]
            except Exception as exc:
                raise to_domain(exc, what=what) from pool_error
            try:
                _configure(conn)
                return work(conn)
            except Exception as exc:
                raise to_domain(exc, what=what) from exc
            finally:
                conn.close()

        tries = self._settings.db_pool_size + 1
        for attempt_no in range(tries):
            try:
                with self._pool.connection(timeout=3.0) as conn:
                    return work(conn)
            except PoolTimeout as exc:
                # The pool had no connection in time. After an outage it backs off between
                # reconnection attempts for seconds; a direct connection tells at once
                # whether the database is back.
                return direct(exc)
            except Exception as exc:
                if attempt_no + 1 < tries and is_connection_error(exc):
                    continue
                raise to_domain(exc, what=what) from exc
        raise AssertionError("unreachable")

    async def _run(self, what: str, work: Callable[[Conn], _T]) -> _T:
        return await trio.to_thread.run_sync(self._attempt, what, work, limiter=self._limiter)

    def _start(self, what: str, work: Callable[[Conn], _T]) -> Pending[_T] | None:
        """Begin `work` in a worker thread now, to collect later; None when every pooled
        connection is in use (then read when needed instead). Its task may go away without
        collecting it: the thread finishes the read and the result is dropped."""
        borrower = object()
        try:
            self._limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            return None
        pending: Pending[_T] = Pending()
        token = trio.lowlevel.current_trio_token()

        def finish(result: outcome.Outcome[_T]) -> None:
            self._limiter.release_on_behalf_of(borrower)
            pending.set(result)

        def deliver(result: outcome.Outcome[_T]) -> None:
            try:
                token.run_sync_soon(finish, result)
            except trio.RunFinishedError:
                pass

        trio.lowlevel.start_thread_soon(lambda: self._attempt(what, work), deliver)
        return pending

    async def get_events(self, query: StreamRange) -> bytes:
        """The serialized GetEventsResponse for `query`.

        A request for a later page (`from_version` above 1) of a stream that has more starts
        reading the page after it (see `PREFETCH_MAX`)."""
        if query.include_snapshot:
            return await self._run("reading a stream",
                                   lambda conn: self._get_events_with_snapshot(conn, query).reply)
        page = await self._prefetched_page(query)
        if page is None:
            page = await self._run("reading a stream",
                                   lambda conn: self._get_events_at_once(conn, query))
        if page.next_from is not None and query.first > 1:
            self._prefetch(replace(query, first=page.next_from))
        return page.reply

    async def _prefetched_page(self, query: StreamRange) -> EventsPage | None:
        """The page read ahead for `query`, if there is one and the stream has not moved
        since; None otherwise."""
        page = await self._prefetched.take(query)
        if page is None:
            return None
        version = await self._run("reading a stream", lambda conn: self._stream_version(
            conn, query.stream_id, query.stream_type))
        if version != page.stream_version:
            self._prefetched.count("stale")
            return None
        self._prefetched.count("hit")
        return page

    def _prefetch(self, query: StreamRange) -> None:
        pending = self._start("reading a stream",
                              lambda conn: self._get_events_at_once(conn, query))
        if pending is not None:
            self._prefetched.put(query, pending)

    async def read_all(self, query: PositionRange) -> bytes:
        """The serialized ReadAllResponse for `query`.

        A page that has more starts reading the page after it. Events never change once
        committed, and a page that has more ends below the head position, so a page read
        ahead that has more is exactly what a fresh read would return and is served; one that
        reached the end of the store (`partial`) is read again, so that a client sees every
        event committed before it asked."""
        page = await self._read_ahead_page(query)
        if page is None:
            page = await self._run("reading all events",
                                   lambda conn: self._read_all(conn, query))
        if page.next_after is not None:
            following = replace(query, after=page.next_after)
            pending = self._start("reading all events",
                                  lambda conn: self._read_all(conn, following))
            if pending is not None:
                self._read_ahead.put(following, pending)
        return page.reply

    async def _read_ahead_page(self, query: PositionRange) -> PositionsPage | None:
        page = await self._read_ahead.take(query)
        if page is None:
            return None
        if page.next_after is None:
            self._read_ahead.count("partial")
            return None
        self._read_ahead.count("hit")
        return page

    async def table_sizes(self) -> tuple[int, int, int]:
        """(events, streams, snapshots): the head position (exact, as positions are dense) and
        PostgreSQL's row estimates — cheap however large the tables are."""
        def sizes(conn: Conn) -> tuple[int, int, int]:
            row = conn.execute(
                "SELECT (SELECT coalesce(max(position), 0) FROM events),"
                " (SELECT greatest(reltuples, 0)::int8 FROM pg_class"
                "   WHERE oid = 'event_streams'::regclass),"
                " (SELECT greatest(reltuples, 0)::int8 FROM pg_class"
                "   WHERE oid = 'snapshots'::regclass)").fetchone()
            assert row is not None
            return int(row[0]), int(row[1]), int(row[2])
        return await self._run("measuring the store", sizes)

    async def head_position(self) -> int:
        return await self._run("reading the head position", self._head)

    async def events_after(self, selector: Selector, after: int, limit: int, *,
                           known_head: int | None = None,
                           ) -> tuple[list[LiveEvent], int, bool]:
        """Selected events after position `after`, oldest first: (events, the position they
        reach, whether more may follow). The position can lie past the last event when the
        selector skipped events; everything selected up to it has been returned.

        `known_head`: a position up to which everything is known to be committed; the read
        then goes up to it without asking for the head first (one round trip instead of two)."""
        return await self._run(
            "reading events",
            lambda conn: self._events_after(conn, selector, after, limit, known_head),
        )

    async def batch_after(self, selector: Selector, after: int, limit: int,
                          max_bytes: int) -> BatchPage:
        """Like `events_after`, but the events come as one serialized EventBatch body (no
        Python object per event): what a catching-up subscription with batches sends."""
        return await self._run("reading events", lambda conn: self._batch_after(
            conn, selector, after, limit, max_bytes))

    def start_batch_after(self, selector: Selector, after: int, limit: int,
                          max_bytes: int) -> Pending[BatchPage] | None:
        """`batch_after`, begun now and collected later (or None: see `_start`): a catching-up
        subscription reads its next page while the previous one is being sent."""
        return self._start("reading events", lambda conn: self._batch_after(
            conn, selector, after, limit, max_bytes))

    def position_of_version(self, conn: Conn, stream_id: str, stream_type: str,
                            version: int) -> int:
        """The position of a stream's event at `version` (or its last event below it)."""
        row = conn.execute(
            "SELECT position FROM events WHERE stream_id = %s AND stream_type = %s"
            " AND version <= %s ORDER BY version DESC LIMIT 1",
            (stream_id, stream_type, version),
        ).fetchone()
        return int(row[0]) if row else 0

    async def stream_start(self, stream_id: str, stream_type: str, version: int) -> int:
        return await self._run("reading a stream", lambda conn: self.position_of_version(
            conn, stream_id, stream_type, version))

    # -- in worker threads --------------------------------------------------------------------

    @staticmethod
    def _stream_version(conn: Conn, stream_id: str, stream_type: str) -> int:
        row = conn.execute(
            "SELECT version FROM event_streams WHERE stream_id = %s AND stream_type = %s",
            (stream_id, stream_type)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _head(conn: Conn) -> int:
        row = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _copy_rows(cur: psycopg.Cursor[TupleRow], query: sql.Composable,
                   params: tuple[object, ...]) -> bytes:
        """The binary COPY output of `query` as one bytes object.

        psycopg's Copy iterator costs several Python calls per row, which on a 2-core machine
        is most of a page's time and holds the GIL against the gRPC loop; here each buffered
        row costs one quick libpq call, and the thread waits for more in `poll()`, with the
        GIL released (see `eventstore.db.libpq`). Parameters are bound client-side, as psycopg
        does for COPY anyway.
        """
        conn = cur.connection
        statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(query)
        text = psycopg.ClientCursor(conn).mogrify(statement, params)
        pgconn = conn.pgconn
        result = pgconn.exec_(text.encode(conn.info.encoding))
        if result.status != pq.ExecStatus.COPY_OUT:
            raise result_error(conn, result)
        data, size = libpq.copy_out(pgconn)
        final = libpq.get_result(pgconn)
        while libpq.get_result(pgconn) is not None:
            pass
        if final is None:
            raise psycopg.OperationalError("COPY ended without a result")
        if size == -2 or final.status != pq.ExecStatus.COMMAND_OK:
            raise result_error(conn, final)
        return data

    @staticmethod
    def _in_one_snapshot(conn: Conn, select: str, query: sql.Composable,
                         params: tuple[object, ...]) -> tuple[pq.abc.PGresult, bytes]:
        """`select`'s result and the binary COPY output of `query`, in one round trip and one
        REPEATABLE READ snapshot (so what the COPY reads agrees with what `select` saw, however
        appends go on). `params` are `select`'s, then `query`'s."""
        statement = sql.SQL(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; {}; COPY ({}) TO STDOUT"
            " (FORMAT BINARY); COMMIT").format(sql.SQL(select), query)
        text = psycopg.ClientCursor(conn).mogrify(statement, params)
        pgconn = conn.pgconn
        libpq.send_query(pgconn, text.encode(conn.info.encoding))
        results: list[pq.abc.PGresult] = []
        data = b""
        size = -1
        while (result := libpq.get_result(pgconn)) is not None:
            results.append(result)
            if result.status == pq.ExecStatus.COPY_OUT:
                data, size = libpq.copy_out(pgconn)
        failed = next((r for r in results if r.status not in (
            pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COPY_OUT)), None)
        # BEGIN, the select, the COPY (started, then done), COMMIT.
        if failed is not None or size == -2 or len(results) != 5:
            if pgconn.transaction_status != pq.TransactionStatus.IDLE:
                pgconn.exec_(b"ROLLBACK")
            raise result_error(conn, failed)
        return results[1], data

    def _select_after(self, conn: Conn, selector: Selector, after: int, limit: int,
                      known_head: int | None = None) -> tuple[bytes, int, int]:
        """COPY output of up to limit + 1 selected events after `after`, the position the
        query covered up to, and the head (or `known_head`, when given)."""
        if known_head is not None and known_head <= after:
            return b"", after, known_head
        # The bound: the head when known; otherwise the head the COPY's own snapshot sees
        # (read in the same round trip, see below). A filtered read also stops after a window.
        window = (None if selector.stream_id is not None or selector.filter.empty
                  else after + self._settings.read_all_scan_window)
        if known_head is None:
            bound = sql.SQL("LEAST(%s::int8, (SELECT coalesce(max(position), 0) FROM events))")
            bound_params: list[object] = [window]
        else:
            bound = sql.SQL("%s")
            bound_params = [known_head if window is None else min(known_head, window)]
        where: list[sql.Composable] = [
            sql.SQL("position > %s AND position <= {}").format(bound)]
        params: list[object] = [after, *bound_params]
        order = sql.SQL("position")
        if selector.stream_id is not None:
            # One stream: its version index bounds the scan, whatever the history's size.
            where.append(sql.SQL("stream_id = %s AND stream_type = %s AND version > %s"))
            params += [selector.stream_id, selector.filter.stream_types[0],
                       selector.after_version]
            order = sql.SQL("version")
        else:
            _add_filter(selector.filter, where, params)
        params.append(limit + 1)
        query = sql.SQL("SELECT {} FROM events WHERE {} ORDER BY {} LIMIT %s").format(
            sql.SQL(EVENT_COLUMNS), sql.SQL(" AND ").join(where), order)
        if known_head is None:
            # Positions become visible in order, so everything up to the snapshot's head is
            # committed: the head and the rows come from one snapshot, in one round trip.
            result, data = self._in_one_snapshot(
                conn, "SELECT coalesce(max(position), 0) FROM events", query, tuple(params))
            head = int(result.get_value(0, 0) or 0)
        else:
            head = known_head
            with conn.cursor() as cur:
                data = self._copy_rows(cur, query, tuple(params))
        if head <= after:
            return b"", after, head
        return data, head if window is None else min(head, window), head

    def _events_after(self, conn: Conn, selector: Selector, after: int, limit: int,
                      known_head: int | None = None) -> tuple[list[LiveEvent], int, bool]:
        data, upper, head = self._select_after(conn, selector, after, limit, known_head)
        if not data:
            return [], upper, False
        events = [LiveEvent(*row) for row in encode_event_list(data)]
        if len(events) > limit:
            del events[limit:]
            return events, events[-1].position, True
        return events, upper, upper < head

    def _batch_after(self, conn: Conn, selector: Selector, after: int, limit: int,
                     max_bytes: int) -> BatchPage:
        data, upper, head = self._select_after(conn, selector, after, limit)
        if not data:
            return BatchPage(b"", 0, 0, upper, False)
        body, count, last_version, last_position, more = encode_events(data, limit, max_bytes)
        if more:
            return BatchPage(body, count, last_version, last_position, True)
        return BatchPage(body, count, last_version, upper, upper < head)

    def _get_events_with_snapshot(self, conn: Conn, q: StreamRange) -> EventsPage:
        reply = pb.GetEventsResponse()
        data = b""
        with conn.cursor() as cur:
            reply.stream_version = self._stream_version(conn, q.stream_id, q.stream_type)
            first = q.first
            # Never past the version read above: the snapshot and the events agree with
            # stream_version, even while appends and snapshot saves go on.
            last = reply.stream_version if q.last is None else min(q.last, reply.stream_version)
            snapshot = latest_snapshot(conn, q.stream_id, q.stream_type, last)
            if snapshot is not None:
                reply.snapshot.CopyFrom(snapshot_message(snapshot))
                first = max(first, snapshot.version + 1)
            if reply.stream_version and first <= last:
                data = self._copy_rows(
                    cur,
                    sql.SQL(
                        f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = %s"
                        " AND stream_type = %s AND version >= %s AND version <= %s"
                        " ORDER BY version LIMIT %s"
                    ),
                    (q.stream_id, q.stream_type, first, last, q.limit + 1),
                )
        return self._events_reply(reply, data, first, q)

    def _get_events_at_once(self, conn: Conn, q: StreamRange) -> EventsPage:
        """GetEvents without a snapshot in one round trip: the stream's version and its events
        up to that version, read in one REPEATABLE READ transaction (one snapshot, so the events
        never go past the version reported, however appends go on)."""
        version_result, data = self._in_one_snapshot(
            conn, "SELECT version FROM event_streams WHERE stream_id = %s AND stream_type = %s",
            sql.SQL(_STREAM_EVENTS_UP_TO_ITS_VERSION),
            (q.stream_id, q.stream_type, q.stream_id, q.stream_type, q.first, q.last,
             q.stream_id, q.stream_type, q.limit + 1))
        stream_version = int(version_result.get_value(0, 0) or 0) if version_result.ntuples else 0
        return self._events_reply(pb.GetEventsResponse(stream_version=stream_version), data,
                                  q.first, q)

    def _events_reply(self, reply: pb.GetEventsResponse, data: bytes, first: int,
                      q: StreamRange) -> EventsPage:
        """The GetEventsResponse: `reply` (version, snapshot) with the events of `data` (COPY
        output read from version `first` on), paging fields set."""
        events = b""
        if data:
            events, count, last_version, _, more = encode_events(
                data, q.limit, self._settings.read_reply_max_bytes)
            reply.has_more = more
            if count:
                first = last_version + 1
        reply.next_from_version = first
        return EventsPage(events + reply.SerializeToString(), reply.stream_version,
                          first if reply.has_more else None)

    def _read_all(self, conn: Conn, q: PositionRange) -> PositionsPage:
        reply = pb.ReadAllResponse()
        max_bytes = self._settings.read_reply_max_bytes
        with conn.cursor() as cur:
            if q.filter.empty:
                data = self._copy_rows(
                    cur,
                    sql.SQL(
                        f"SELECT {EVENT_COLUMNS} FROM events WHERE position > %s"
                        " ORDER BY position LIMIT %s"
                    ),
                    (q.after, q.limit + 1),
                )
                events, count, _, last_position, more = encode_events(data, q.limit, max_bytes)
                reply.has_more = more
                reply.next_from_position = last_position if count else q.after
            else:
                # A filter may skip many rows: scan a bounded window of positions per call and
                # report how far it got, so the caller advances past filtered-out events.
                head = self._head(conn)
                upper = min(head, q.after + self._settings.read_all_scan_window)
                where: list[sql.Composable] = [sql.SQL("position > %s AND position <= %s")]
                params: list[object] = [q.after, upper]
                _add_filter(q.filter, where, params)
                params.append(q.limit + 1)
                query = sql.SQL("SELECT {} FROM events WHERE {} ORDER BY position LIMIT %s").format(
                    sql.SQL(EVENT_COLUMNS), sql.SQL(" AND ").join(where)
                )
                data = self._copy_rows(cur, query, tuple(params))
                events, count, _, last_position, more = encode_events(data, q.limit, max_bytes)
                if more:
                    reply.has_more = True
                    reply.next_from_position = last_position
                else:
                    reply.next_from_position = max(upper, q.after)
                    reply.has_more = upper < head
        return PositionsPage(events + reply.SerializeToString(),
                             reply.next_from_position if reply.has_more else None)


def _add_filter(event_filter: EventFilter, where: list[sql.Composable],
                params: list[object]) -> None:
    """The WHERE conditions (and their parameters) of a ReadAll / SubscribeToAll filter."""
    if event_filter.stream_types:
        where.append(sql.SQL("stream_type = ANY(%s)"))
        params.append(list(event_filter.stream_types))
    if event_filter.event_type_prefixes:
        where.append(sql.SQL("event_type LIKE ANY(%s)"))
        params.append([like_prefix(p) for p in event_filter.event_type_prefixes])
    if event_filter.type_patterns:
        where.append(sql.SQL("stream_type LIKE ANY(%s)"))
        params.append([like_pattern(p) for p in event_filter.type_patterns])
