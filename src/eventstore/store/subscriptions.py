"""Live delivery: the feed task that follows the head, and subscriptions.

`LiveFeed.run` keeps one `Window` of recent events per server process. It is woken after each
local commit (the writer's listener), by PostgreSQL NOTIFY for commits made by other server
processes (`listen_for_commits`), and by a slow poll as a safety net; each wake-up reads what
was committed since, once, for every subscriber.

`subscribe` is one subscription: it catches up from the database while it is behind the window,
then follows the window. Events arrive in position order, each once, with no gap: the cursor
only moves to positions up to which everything selected has been sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import psycopg
import trio
from psycopg.rows import TupleRow

from eventstore._es_codec import encode_event_list
from eventstore.config import Settings
from eventstore.db.connection import connect
from eventstore.db.errors import is_connection_error
from eventstore.db.statements import exec_all_in_loop
from eventstore.errors import Unavailable
from eventstore.store.live import (
    LiveEvent,
    Selector,
    Window,
    batch_body_notification,
    caught_up_notification,
    checkpoint_notification,
    frame,
)
from eventstore.store.peers import ANNOUNCE_SECONDS, HELLO, HERE, Peers, is_commit
from eventstore.store.reader import BatchPage, Pending, Reader

log = logging.getLogger(__name__)

COMMIT_CHANNEL = "eventstore_commits"
# The listener's application_name (pg_stat_activity tells it from the other connections).
LISTENER_NAME = "eventstore-listener"
# A page of catch-up or of the feed's reads.
READ_PAGE = 5_000
# Bytes of one batch notification (grpcio's default receive limit is 4 MiB).
BATCH_MAX_BYTES = 3_500_000
# Idle subscriptions send at least this often, so a client that went away is noticed
# (purerpc sees a cancelled stream only when it next sends).
HEARTBEAT_SECONDS = 2.0
# How often the feed wakes every waiting subscription to look at the clock (see `wait_beyond`).
TICK_SECONDS = 0.25


class LiveFeed:
    """The shared window of recent events and the task that fills it."""

    def __init__(self, reader: Reader, settings: Settings) -> None:
        self._reader = reader
        self._settings = settings
        self.window: Window | None = None
        self._wake = trio.Event()
        # A position up to which everything is known to be committed (this process's writer
        # says so after each commit): reading up to it needs no head query first.
        self._committed_up_to = 0
        # Set when something may have been committed beyond that position (another process's
        # NOTIFY, or the poll): the next read asks for the head.
        self._head_unknown = False
        self._grew = trio.Event()
        # Whether `_tick` runs (waits then need no timeout of their own).
        self._ticking = False
        self._closed = False
        self._subscribers = 0
        # Set when a subscription ends (`ended`).
        self._left = trio.Event()
        # Each open subscription's cursor, for the lag metric.
        self._positions: dict[object, int] = {}

    @property
    def subscribers(self) -> int:
        return self._subscribers

    async def ended(self) -> None:
        """Return once no subscription is open (at shutdown, after `close`)."""
        while self._subscribers:
            self._left = trio.Event()
            await self._left.wait()

    def lag(self) -> int:
        """Positions between the window's end and the furthest-behind open subscription."""
        window = self.window
        if window is None or not self._positions:
            return 0
        return max(0, window.end - min(self._positions.values()))

    def committed(self, first: int, last: int, rows: bytes | None) -> None:
        """This process's writer committed positions first..last; `rows` are those events as
        binary COPY output when it read them back. Events that continue the window go into it
        at once (no read); otherwise the feed reads what it misses — up to `last` without
        asking for the head: positions are dense under the writer's lock, so after a commit
        that ended at `last` nothing at or below it is still in flight."""
        self._committed_up_to = max(self._committed_up_to, last)
        window = self.window
        if window is None or window.end >= last:
            return
        if not self._subscribers:
            # Nobody follows the head: the window moves past the commit here, as the feed's
            # task would (`_read_new`), without waking that task for every commit.
            window.skip_to(last)
            self._signal()
            return
        if rows is not None and window.end == first - 1:
            try:
                events = [LiveEvent(*row) for row in encode_event_list(rows)]
            except ValueError:
                log.exception("the writer's read-back could not be decoded; reading instead")
                events = []
            if len(events) == last - first + 1:
                window.extend(events, last)
                self._signal()
                return
        self._wake.set()

    def wake(self) -> None:
        """Something was committed somewhere (another server process's NOTIFY): read up to
        the head soon. Cheap; call it as often as you like."""
        self._head_unknown = True
        self._wake.set()

    def close(self) -> None:
        """End every subscription with UNAVAILABLE (server shutting down)."""
        self._closed = True
        self._grew.set()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down; resubscribe to another server")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        head = await self._reader.head_position()
        self.window = Window(head, max_events=self._settings.live_window_events,
                             max_bytes=self._settings.live_window_bytes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick)
            self._ticking = True
            try:
                task_status.started()
                await self._follow()
            finally:
                # Waits relying on the tick must look at their deadlines again.
                self._ticking = False
                self._signal()

    async def _follow(self) -> None:
        poll = self._settings.live_poll_ms / 1000
        while True:
            with trio.move_on_after(poll) as polled:
                await self._wake.wait()
            if polled.cancelled_caught:
                self._head_unknown = True
            self._wake = trio.Event()
            try:
                await self._read_new()
            except Unavailable:
                log.warning("live feed cannot read new events; retrying")
                await trio.sleep(min(poll, 1.0))

    async def _read_new(self) -> None:
        window = self.window
        assert window is not None
        known = self._committed_up_to
        head_unknown, self._head_unknown = self._head_unknown, False
        if self._subscribers == 0:
            # Nobody follows the head: move the window past what is committed instead of
            # reading it. A subscription that starts later and finds itself before the window
            # catches up from the database, as one that fell behind does.
            if head_unknown:
                known = max(known, await self._reader.head_position())
            if known > window.end:
                window.skip_to(known)
                self._signal()
            return
        everything = Selector()
        while True:
            known = self._committed_up_to
            start = window.end
            events, reached, more = await self._reader.events_after(
                everything, start, READ_PAGE,
                known_head=known if known > start and not head_unknown else None)
            # (The writer may have put its own commits into the window during the read:
            # `extend` skips what it already has.)
            if reached > window.end:
                window.extend(events, reached)
                self._signal()
            if not more:
                return

    def _signal(self) -> None:
        """Wake every subscription waiting in `wait_beyond`."""
        self._grew.set()
        self._grew = trio.Event()

    async def _tick(self) -> None:
        """Wake the waiting subscriptions every TICK_SECONDS, so that a wait far from its
        deadline needs no timeout of its own (see `wait_beyond`)."""
        while True:
            await trio.sleep(TICK_SECONDS)
            self._signal()

    async def wait_beyond(self, position: int, seconds: float) -> bool:
        """Wait at most `seconds` until the window reaches past `position`; False if not.

        A timeout is a cancel scope, which costs more than the rest of a subscriber's wake-up
        when the feed wakes every live subscription for each commit (measured: a fifth of the
        server's Python time with 64 subscribers). So only a wait within two ticks of its
        deadline gets one; a longer wait relies on the feed's tick to look at the clock again
        in time."""
        deadline = trio.current_time() + seconds
        while not self._closed:
            window = self.window
            if window is not None and window.end > position:
                return True
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            if remaining > 2 * TICK_SECONDS and self._ticking:
                await self._grew.wait()
            else:
                with trio.move_on_after(remaining):
                    await self._grew.wait()
        self._check_open()
        return False


@dataclass(frozen=True)
class SubscriptionSpec:
    """A validated SubscribeToStream / SubscribeToAll request."""

    selector: Selector
    after: int  # position (exclusive)
    include_existing: bool
    max_batch: int
    checkpoint_seconds: float
    # SubscribeToStream's from_version with history: the subscription starts at that version's
    # position (looked up when it starts; `after` is then ignored).
    start_version: int = 0


async def subscribe(feed: LiveFeed, reader: Reader, spec: SubscriptionSpec,
                    ) -> AsyncIterator[bytes]:
    """The serialized EventNotifications of one subscription, until the client goes away or
    the server shuts down (then `Unavailable`).

    One generator from here to the transport: with many live subscribers, every layer of async
    generator costs each of them a little on every event."""
    feed._subscribers += 1
    token = object()
    try:
        selector = spec.selector
        window = feed.window
        assert window is not None
        interval = min(spec.checkpoint_seconds, HEARTBEAT_SECONDS)
        if spec.include_existing and spec.start_version and selector.stream_id is not None:
            start = await reader.stream_start(selector.stream_id, selector.filter.stream_types[0],
                                              spec.start_version)
        else:
            start = spec.after
        # Everything committed before the call: history ends here (the feed may not have read it
        # all yet, so the window's end is not the answer).
        history_end = await reader.head_position()
        caught_up = False
        if spec.include_existing:
            position = start
        else:
            position = history_end
            caught_up = True
            yield caught_up_notification(position)
        last_sent = time.monotonic()
        # Catch-up pages being read ahead, by the position each reads after.
        ahead: dict[int, Pending[BatchPage]] = {}

        while True:
            feed._check_open()
            if not caught_up and position >= history_end:
                # History is delivered (or was skipped: from_position beyond the head).
                caught_up = True
                yield caught_up_notification(position)
                last_sent = time.monotonic()
            if window.covers(position):
                if ahead:
                    # Caught up with the window: a page read ahead on a wrong guess is not needed.
                    ahead.clear()
                events, reached = window.since(position, READ_PAGE)
                selected = [e for e in events if selector.matches(e)]
            elif position < window.start and spec.max_batch > 1:
                # Behind the window, in batches: one query per batch, encoded in Rust. The next
                # batches are read while this one is sent (see `_read_ahead`).
                pending = ahead.pop(position, None)
                for stale in [p for p in ahead if p < position]:
                    del ahead[stale]
                if pending is not None:
                    page = await pending.result()
                else:
                    page = await reader.batch_after(selector, position, spec.max_batch,
                                                    BATCH_MAX_BYTES)
                if page.count and selector.stream_id is not None:
                    selector = Selector(selector.filter, selector.stream_id, page.last_version)
                _read_ahead(reader, selector, spec, ahead, position, page.reached, window.start)
                if page.count:
                    yield batch_body_notification(page.body)
                    last_sent = time.monotonic()
                selected, reached = [], page.reached
            elif position < window.start:
                # Behind the window: catch up from the database.
                selected, reached, _ = await reader.events_after(selector, position, READ_PAGE)
            else:
                # Ahead of the window (the feed has not read the newest commit yet).
                if not await feed.wait_beyond(position, interval):
                    yield checkpoint_notification(position)
                    last_sent = time.monotonic()
                continue

            for message in frame(selected, spec.max_batch, BATCH_MAX_BYTES):
                yield message
                last_sent = time.monotonic()
            if selected and selector.stream_id is not None:
                selector = Selector(selector.filter, selector.stream_id, selected[-1].version)
            position = reached
            feed._positions[token] = position
            if not caught_up and position >= history_end:
                caught_up = True
                yield caught_up_notification(position)
                last_sent = time.monotonic()
            if window.covers(position) and position == window.end:
                # Live and idle: wait for the next commit, with heartbeats/checkpoints. (The window
                # cannot grow unless this task yields, so the wait, or the checkpoint sent when it
                # times out, is this round's yield to Trio.)
                remaining = max(0.0, last_sent + interval - time.monotonic())
                if not await feed.wait_beyond(position, remaining):
                    yield checkpoint_notification(position)
                    last_sent = time.monotonic()
                continue
            if time.monotonic() - last_sent >= interval:
                yield checkpoint_notification(position)
                last_sent = time.monotonic()
            await trio.lowlevel.checkpoint()
    finally:
        feed._subscribers -= 1
        feed._left.set()
        feed._positions.pop(token, None)


# Catch-up pages read ahead of the one being sent, per subscription (each up to
# BATCH_MAX_BYTES): enough to keep PostgreSQL, the reader threads and the gRPC loop busy at once
# on a small machine.
READ_AHEAD_PAGES = 2


def _read_ahead(reader: Reader, selector: Selector, spec: SubscriptionSpec,
                ahead: dict[int, Pending[BatchPage]], read_from: int, reached: int,
                window_start: int) -> None:
    """Start reading the pages that follow one read from `read_from` up to `reached`: the next
    one for certain, and, when reading all streams, the one after it on the guess that it will
    span as many positions again (true of every full page while nothing is filtered out, as
    positions are dense). A wrong guess costs one read, whose result is dropped: a page is only
    used by the read that starts exactly where it does. Pages at or past the window's start
    are left to the window."""
    starts = [reached]
    if selector.stream_id is None and reached > read_from:
        starts.append(reached + (reached - read_from))
    for start in starts:
        if len(ahead) >= READ_AHEAD_PAGES or start >= window_start:
            return
        if start not in ahead:
            pending = reader.start_batch_after(selector, start, spec.max_batch, BATCH_MAX_BYTES)
            if pending is None:
                return
            ahead[start] = pending


async def listen_for_commits(url: str, feed: LiveFeed,
                             own_writer_pid: Callable[[], int | None] = lambda: None,
                             peers: Peers | None = None, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                             ) -> None:
    """Wake the feed on every commit NOTIFY from another server process's writer (one per
    committed batch; this process's own writer wakes the feed directly, so its NOTIFYs,
    recognised by the backend pid they carry, are ignored), and tell `peers` which other
    server processes listen (`eventstore.store.peers`: announcing itself, answering and
    repeating). Reconnects by itself; the feed's poll covers the time it is away.

    The event loop waits on the connection's socket itself: a worker thread blocked in libpq
    would be woken by every commit of this process's own writer too, and then compete with
    the event loop for the GIL just to skip that notification.

    Reports started once its first connection is made (or has failed): a server is then ready
    with its peers told of it.
    """
    peers = peers if peers is not None else Peers()
    conn: psycopg.Connection[TupleRow] | None = None
    stopping = False
    started = False

    def open_listening() -> psycopg.Connection[TupleRow]:
        opened = connect(url, autocommit=True, application_name=LISTENER_NAME)
        opened.execute(f"LISTEN {COMMIT_CHANNEL}; NOTIFY {COMMIT_CHANNEL}, '{HELLO}'")
        if stopping:  # abandoned meanwhile (see below)
            opened.close()
        return opened

    try:
        while True:
            try:
                if conn is None or conn.closed:
                    # Abandoned on cancellation: connecting to a database that does not answer
                    # must not hold up the server's shutdown (connect_timeout is 5 s).
                    conn = await trio.to_thread.run_sync(open_listening, abandon_on_cancel=True)
                    peers.listening(True)
                    beat_at = trio.current_time() + ANNOUNCE_SECONDS
                if not started:
                    task_status.started()
                    started = True
                pgconn = conn.pgconn
                own = (own_writer_pid(), pgconn.backend_pid)
                woken = False
                answer = None
                while (notify := pgconn.notifies()) is not None:
                    if notify.be_pid in own:
                        continue
                    payload = notify.extra.decode()
                    answer = peers.heard(payload) or answer
                    woken = woken or is_commit(payload)
                if woken:
                    feed.wake()
                if answer is None and trio.current_time() >= beat_at:
                    answer = HERE
                if answer is not None:
                    # Notifications arriving meanwhile wait in libpq: the loop reads them
                    # before it waits on the socket again.
                    await _announce(conn, answer)
                    beat_at = trio.current_time() + ANNOUNCE_SECONDS
                    continue
                with trio.move_on_at(beat_at):
                    await trio.lowlevel.wait_readable(pgconn.socket)
                pgconn.consume_input()
            except psycopg.Error as exc:
                if not is_connection_error(exc):
                    raise
                log.warning("the commit listener lost its connection: %s", exc)
                peers.listening(False)
                if conn is not None:
                    conn.close()
                conn = None
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(1.0)
    finally:
        stopping = True
        peers.listening(False)
        if conn is not None:
            conn.close()



async def _announce(conn: psycopg.Connection[TupleRow], payload: str) -> None:
    """NOTIFY `payload` on the commit channel, from the event loop."""
    try:
        await exec_all_in_loop(conn, f"NOTIFY {COMMIT_CHANNEL}, '{payload}'")
    except psycopg.Error as exc:
        if is_connection_error(exc):
            raise
        # Whatever it was, a new connection is the way out (see the caller).
        raise psycopg.OperationalError(f"NOTIFY failed: {exc}") from exc
