"""I/O-free rules: batching, idempotency classification, request validation, settings, the
status table."""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass, field
from typing import cast

import anyio
import anyio.abc
import pytest
import trio
import trio.testing
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived
from purerpc.grpclib.status import StatusCode

import eventstore
from eventstore.config import ConfigError, Settings, load_settings
from eventstore.errors import (
    AlreadyExists,
    EventStoreError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LimitExceeded,
    Unavailable,
    WrongExpectedVersion,
)
from eventstore.grpc.http2 import ServerConnection
from eventstore.grpc.status import STATUS_OF, to_status
from eventstore.grpc.transport import _EagerSocket, _EagerStream
from eventstore.store.batching import (
    Retry,
    Reused,
    StoredEvent,
    classify_stored,
    guess_versions,
    take_batch,
)
from eventstore.store.live import (
    LiveEvent,
    Window,
    caught_up_notification,
    checkpoint_notification,
    frame,
)
from eventstore.store.peers import (
    ANNOUNCE_SECONDS,
    EXPIRY_SECONDS,
    HELLO,
    HERE,
    Peers,
    is_commit,
)
from eventstore.store.reader import Reader
from eventstore.store.subscriptions import TICK_SECONDS, LiveFeed
from eventstore.store.validation import (
    EventFilter,
    like_prefix,
    page_size,
    parse_filter,
    parse_stream_range,
    parse_uuid,
)


@dataclass
class Req:
    event_count: int = 1
    payload_bytes: int = 10
    client_event_ids: list[str] = field(default_factory=list)


def test_take_batch_respects_limits_and_takes_at_least_one() -> None:
    queue = deque([Req(5), Req(5), Req(5)])
    assert len(take_batch(queue, max_events=10, max_bytes=1000)) == 2
    assert len(queue) == 1
    big = deque([Req(50), Req(1)])
    assert len(take_batch(big, max_events=10, max_bytes=1000)) == 1
    by_bytes = deque([Req(payload_bytes=600), Req(payload_bytes=600)])
    assert len(take_batch(by_bytes, max_events=10, max_bytes=1000)) == 1


def test_take_batch_stops_before_a_request_sharing_a_client_id() -> None:
    queue = deque([Req(client_event_ids=["a"]), Req(client_event_ids=["b"]),
                   Req(client_event_ids=["a"]), Req()])
    batch = take_batch(queue, max_events=100, max_bytes=10_000)
    assert [r.client_event_ids for r in batch] == [["a"], ["b"]]
    assert len(queue) == 2


@dataclass
class Aimed:
    stream_id: str
    expected_version: int | None
    stream_type: str = "T"


def test_guess_versions_from_what_the_writer_saw_else_from_the_first_request() -> None:
    keys = {("a", "T"): 0, ("b", "T"): 1}
    # Known versions win over what clients expect; an unseen stream takes the expectation of
    # the batch's first request on it (later ones are decided on top of that).
    assert guess_versions(keys, [Aimed("a", 9), Aimed("b", 4), Aimed("b", 0)],
                          {("a", "T"): 2}) == [2, 4]
    assert guess_versions(keys, [Aimed("a", 0), Aimed("b", 0)], {}) == [0, 0]
    # An unseen stream appended at any version, or "must exist", names no version.
    assert guess_versions(keys, [Aimed("a", 1), Aimed("b", None)], {}) is None
    assert guess_versions(keys, [Aimed("a", 1), Aimed("b", -1)], {}) is None
    assert guess_versions(keys, [Aimed("a", None), Aimed("b", -1)],
                          {("a", "T"): 1, ("b", "T"): 7}) == [1, 7]
    # Stream types are part of the key.
    assert guess_versions({("a", "U"): 0}, [Aimed("a", 3, "U")], {("a", "T"): 5}) == [3]


def stored(event_id: str, version: int, position: int, stream: str = "s",
           stream_type: str = "T") -> StoredEvent:
    return StoredEvent(event_id, stream, stream_type, version, position)


def test_classify_stored() -> None:
    ids = ["a", "b"]
    assert classify_stored(ids, "s", "T", {}) is None
    assert classify_stored(ids, "s", "T", {"a": stored("a", 3, 10), "b": stored("b", 4, 11)}) == \
        Retry(3, 10)
    assert isinstance(classify_stored(ids, "s", "T", {"a": stored("a", 3, 10)}), Reused)
    assert isinstance(classify_stored(
        ids, "s", "T", {"a": stored("a", 3, 10), "b": stored("b", 5, 11)}), Reused)
    elsewhere = classify_stored(
        ids, "s", "T", {"a": stored("a", 3, 10), "b": stored("b", 4, 11, stream="t")})
    assert isinstance(elsewhere, Reused)
    # Not which stream: the caller may not be allowed to read it.
    assert elsewhere.message == "event id b is already stored in another stream"

    assert isinstance(classify_stored(
        ids, "s", "T", {"a": stored("a", 4, 11), "b": stored("b", 3, 10)}), Reused)


def test_parse_uuid_canonicalizes() -> None:
    assert parse_uuid("f", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11") == \
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    with pytest.raises(InvalidArgument, match='f: not a UUID: "xyz"'):
        parse_uuid("f", "xyz")
    with pytest.raises(InvalidArgument, match="f: required"):
        parse_uuid("f", "")
    # API.md: "a UUID in canonical text form" (the spellings uuid.UUID also reads are not).
    canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    for spelling in (canonical.replace("-", ""), "{" + canonical + "}", "urn:uuid:" + canonical,
                     canonical + "\n", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1\u0661"):
        with pytest.raises(InvalidArgument, match="f: not a UUID"):
            parse_uuid("f", spelling)


def test_the_listen_address_is_loopback_unless_callers_must_authenticate() -> None:
    from eventstore.config import listen_host

    assert listen_host(None, "open") == "127.0.0.1"
    assert listen_host(None, "api_keys") == "*" and listen_host(None, "mtls") == "*"
    assert listen_host("0.0.0.0", "open") == "0.0.0.0"  # set on purpose
    assert listen_host("127.0.0.1", "api_keys") == "127.0.0.1"
    assert load_settings({}).host is None and load_settings({"HOST": "*"}).host == "*"


def test_page_size() -> None:
    assert page_size("m", 0, 1000, 10_000) == 1000
    assert page_size("m", 50_000, 1000, 10_000) == 10_000
    assert page_size("m", 7, 1000, 10_000) == 7
    with pytest.raises(InvalidArgument, match="m: must not be negative"):
        page_size("m", -1, 1000, 10_000)


def test_stream_range_rules() -> None:
    r = parse_stream_range("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "T", 0, None, 0, False,
                           default_page=10, max_page=20)
    assert (r.first, r.last, r.limit) == (1, None, 10)
    with pytest.raises(InvalidArgument, match="to_version"):
        parse_stream_range("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "T", 5, 4, 0, False,
                           default_page=10, max_page=20)


def test_filter() -> None:
    f = parse_filter(["A", "A"], ["Order"])
    assert f == EventFilter(("A",), ("Order",))
    assert f.matches("A", "OrderPlaced") and not f.matches("B", "OrderPlaced")
    assert not f.matches("A", "UserCreated")
    assert EventFilter().empty and EventFilter().matches("x", "y")
    with pytest.raises(InvalidArgument, match=r"filter.stream_types\[1\]"):
        parse_filter(["A", ""], [])
    assert like_prefix("a_b%c\\") == "a\\_b\\%c\\\\%"


def test_settings_defaults_and_errors() -> None:
    s = load_settings({})
    assert (s.port, s.http_port, s.snapshot_threshold, s.snapshot_retention_days) == \
        (50051, 8080, 100, 30)
    assert s.database_url is None
    s = load_settings({"PORT": "6000", "SNAPSHOT_THRESHOLD": "10", "LOG_LEVEL": "debug"})
    assert (s.port, s.snapshot_threshold, s.log_level) == (6000, 10, "DEBUG")
    for env, name in [({"PORT": "abc"}, "PORT"), ({"PORT": "70000"}, "PORT"),
                      ({"SNAPSHOT_RETENTION_DAYS": "-1"}, "SNAPSHOT_RETENTION_DAYS"),
                      ({"HTTP_PORT": "x"}, "HTTP_PORT"), ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
                      ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE")]:
        with pytest.raises(ConfigError) as err:
            load_settings(env)
        assert str(err.value).startswith(name), err.value


def test_status_table_covers_every_domain_error() -> None:
    expected = {
        InvalidArgument: StatusCode.INVALID_ARGUMENT,
        LimitExceeded: StatusCode.RESOURCE_EXHAUSTED,
        AlreadyExists: StatusCode.ALREADY_EXISTS,
        FailedPrecondition: StatusCode.FAILED_PRECONDITION,
        Unavailable: StatusCode.UNAVAILABLE,
        Internal: StatusCode.INTERNAL,
    }
    for cls, code in expected.items():
        status, trailers = to_status(cls("m"))
        assert status.status_code == code and status.status_message == "m" and trailers == []
    status, trailers = to_status(WrongExpectedVersion(3, 5))
    assert status.status_code == StatusCode.ABORTED
    assert status.status_message == "wrong expected version: expected 3, actual 5"
    assert trailers == [("expected-version", "3"), ("actual-version", "5")]
    leaves = {c for c in vars(eventstore.errors).values()
              if isinstance(c, type) and issubclass(c, EventStoreError)
              and c is not EventStoreError}
    assert leaves <= set(STATUS_OF)


def test_public_exports() -> None:
    for name in eventstore.__all__:
        assert hasattr(eventstore, name), name


def live_event(position: int, size: int = 10) -> LiveEvent:
    return LiveEvent(position, 1, "s", "T", "E", b"x" * size)


def test_window_covers_evicts_and_reads_from_anywhere() -> None:
    window = Window(0, max_events=2000, max_bytes=10**9)
    assert window.covers(0) and not window.covers(1) and window.since(0, 10) == ([], 0)
    for start in range(0, 10_000, 100):  # holes: every other position
        window.extend([live_event(p) for p in range(start + 2, start + 101, 2)], start + 100)
    assert len(window) == 2000 and window.end == 10_000
    assert window.start == 6000 and not window.covers(5999) and window.covers(6000)
    events, reached = window.since(6000, 5)
    assert [e.position for e in events] == [6002, 6004, 6006, 6008, 6010] and reached == 6010
    events, reached = window.since(9990, 100)
    assert [e.position for e in events] == [9992, 9994, 9996, 9998, 10_000]
    assert reached == 10_000
    window.extend([], 10_050)  # a hole at the head: covered, nothing to read
    assert window.since(10_000, 10) == ([], 10_050)


@pytest.mark.parametrize("ticking", [False, True])
async def test_live_waits_end_at_their_deadline_or_at_growth(
        ticking: bool, autojump_clock: trio.testing.MockClock) -> None:
    """A subscription's wait for the next commit ends exactly at its deadline (then it sends a
    checkpoint) or as soon as the window grows — with the feed's tick (long waits then carry no
    timeout of their own) and without it. The clock is Trio's mock clock: nothing is slept."""
    feed = LiveFeed(cast(Reader, None), Settings())
    feed.window = Window(10, max_events=100, max_bytes=10**6)
    async with trio.open_nursery() as nursery:
        if ticking:
            nursery.start_soon(feed._tick)
            feed._ticking = True
        for seconds in (0.1, 2 * TICK_SECONDS, 1.3, 7.0):
            start = trio.current_time()
            assert not await feed.wait_beyond(10, seconds)
            assert trio.current_time() - start == pytest.approx(seconds, abs=1e-9)

        async def grow() -> None:
            await trio.sleep(2.7)
            feed.window.extend([live_event(11)], 11)  # type: ignore[union-attr]
            feed._signal()

        nursery.start_soon(grow)
        start = trio.current_time()
        assert await feed.wait_beyond(10, 30.0)
        assert trio.current_time() - start == pytest.approx(2.7, abs=1e-9)
        feed.close()
        with pytest.raises(Unavailable):
            await feed.wait_beyond(11, 30.0)
        nursery.cancel_scope.cancel()


def test_commits_move_an_unfollowed_window_without_waking_the_feed() -> None:
    """With nobody subscribed, this process's commits move the window past themselves at
    once (a subscription that starts later catches up from the database); the feed's task is
    woken only to read what subscribers will be sent."""
    feed = LiveFeed(cast(Reader, None), Settings())
    feed.window = Window(10, max_events=100, max_bytes=10**6)
    feed.committed(11, 15, None)
    assert (feed.window.start, feed.window.end) == (15, 15) and not feed._wake.is_set()
    feed.committed(12, 14, None)  # an older announcement: nothing moves
    assert feed.window.end == 15 and not feed._wake.is_set()
    feed._subscribers = 1
    feed.committed(16, 17, None)  # no rows read back: the feed reads them
    assert feed.window.end == 15 and feed._wake.is_set()


def test_window_byte_limit() -> None:
    window = Window(0, max_events=1000, max_bytes=100)
    window.extend([live_event(p, 30) for p in range(1, 6)], 5)
    assert len(window) == 3 and window.size_bytes == 90 and window.start == 2


def test_window_extend_skips_what_it_already_has() -> None:
    """A feed read that raced the writer's hand-over returns events the window already has."""
    window = Window(0, max_events=1000, max_bytes=10**6)
    window.extend([live_event(p) for p in range(1, 6)], 5)
    window.extend([live_event(p) for p in range(3, 9)], 8)
    window.extend([live_event(p) for p in range(7, 9)], 8)
    assert [e.position for e in window.since(0, 100)[0]] == list(range(1, 9))
    assert window.size_bytes == 80


def test_window_skip_covers_nothing_before_it() -> None:
    window = Window(0, max_events=1000, max_bytes=10**6)
    window.extend([live_event(p) for p in range(1, 11)], 10)
    window.skip_to(25)
    assert (window.start, window.end, len(window), window.size_bytes) == (25, 25, 0, 0)
    assert not window.covers(24) and window.covers(25)
    window.extend([live_event(26)], 26)
    assert window.since(25, 10) == ([live_event(26)], 26)
    with pytest.raises(ValueError, match="backwards"):
        window.skip_to(20)


def test_framing_round_trips_through_protobuf() -> None:
    from eventstore.v1 import eventstore_pb2 as pb

    event = pb.Event(event_id="e", version=3, position=7)
    live = LiveEvent(7, 3, "s", "T", "E", event.SerializeToString())
    assert pb.EventNotification.FromString(frame([live], 1, 1000)[0]).event == event
    batches = frame([live] * 5, 2, 10**6)
    assert [len(pb.EventNotification.FromString(b).batch.events) for b in batches] == [2, 2, 1]
    assert pb.EventNotification.FromString(checkpoint_notification(300)).checkpoint.position \
        == 300
    assert pb.EventNotification.FromString(caught_up_notification(0)).HasField("caught_up")


def test_log_formats_carry_the_structured_fields() -> None:
    import json
    import logging

    from eventstore.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord("eventstore.server", logging.INFO, __file__, 1,
                               "eventstore listening", None, None)
    record.grpc_port = 50051
    assert json.loads(JsonFormatter().format(record))["grpc_port"] == 50051
    text = TextFormatter().format(record)
    assert "eventstore listening" in text and "grpc_port=50051" in text
    # The timestamp's second is cached: a record of another second gets its own.
    formatter = JsonFormatter()
    stamps = []
    for created in (1000.5, 1000.75, 1001.25, 1000.125):
        record.created, record.msecs = created, (created - int(created)) * 1000
        stamps.append(json.loads(formatter.format(record))["ts"])
    assert stamps == ["1970-01-01T00:16:40.500Z", "1970-01-01T00:16:40.750Z",
                      "1970-01-01T00:16:41.250Z", "1970-01-01T00:16:40.125Z"]


def test_audit_lines_bypass_logging_only_while_it_is_as_configured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import json
    import logging
    import sys

    from eventstore import audit, logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_json", None)
    handled: list[logging.LogRecord] = []
    monkeypatch.setattr(audit.audit_log, "handle", handled.append)

    def line(level: str = "INFO", fmt: str = "json") -> str:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        logs.configure_logging(level, fmt)
        audit.record("append", caller="anonymous", peer="127.0.0.1:1", outcome="ok",
                     seconds=0.0012, stream_id="s", event_count=1, reason="100%")
        return stream.getvalue()

    try:
        direct = line()
        assert not handled  # no LogRecord was made
        (written,) = direct.splitlines()
        # Through `logging` once a handler is added on the way: the same line.
        extra = logging.NullHandler()
        audit.audit_log.addHandler(extra)
        try:
            assert line() == ""
        finally:
            audit.audit_log.removeHandler(extra)
        (record,) = handled
        assert record.getMessage() == "audit append ok"
        ours, theirs = json.loads(written), json.loads(logs.JsonFormatter().format(record))
        assert list(ours) == list(theirs)
        assert {**ours, "ts": None} == {**theirs, "ts": None}
        assert ours["logger"] == "eventstore.audit" and ours["level"] == "info"
        assert ours["reason"] == "100%" and ours["duration_ms"] == 1.2
        # A level that leaves the audit log out, and the text format, go the usual way.
        assert line("WARNING") == "" and len(handled) == 1
        assert line("INFO", "text") == "" and len(handled) == 2
        # Another handler on the root logger (a test's capture, an operator's).
        logs.configure_logging("INFO", "json")
        other = logging.NullHandler()
        root.addHandler(other)
        assert logs.write_json(audit.audit_log, logging.INFO, "m", {}) is False
        root.removeHandler(other)
        assert logs.write_json(audit.audit_log, logging.INFO, "m", {}) is True
        # Another formatter on the server's handler.
        root.handlers[0].setFormatter(logs.TextFormatter())
        assert logs.write_json(audit.audit_log, logging.INFO, "m", {}) is False
        # The last nanoseconds of a second are still that second (as a float of seconds
        # since 1970, this one is the next second).
        monkeypatch.setattr(logs.time, "time_ns", lambda: 1_800_000_000 * 10**9 + 999_999_950)
        (stamped,) = line().splitlines()
        assert json.loads(stamped)["ts"] == "2027-01-15T08:00:00.999Z"
        monkeypatch.undo()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_an_audit_line_whose_write_fails_is_reported_once_and_not_written_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import logging
    import sys

    from eventstore import audit, logs

    class FailingFlush(io.StringIO):
        def flush(self) -> None:
            raise BlockingIOError("the pipe is full")

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_json", None)
    stream = FailingFlush()
    monkeypatch.setattr(sys, "stderr", stream)
    reported: list[logging.LogRecord] = []
    try:
        logs.configure_logging("INFO", "json")
        monkeypatch.setattr(root.handlers[0], "handleError", reported.append)
        audit.record("append", caller="anonymous", peer="127.0.0.1:1", outcome="ok",
                     seconds=0.001, stream_id="s", event_count=1)
        assert stream.getvalue().count("audit append ok") == 1
        assert [r.getMessage() for r in reported] == ["audit append ok"]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


class _Frames:
    """Stands in for purerpc's connection: the bytes queued for sending."""

    def __init__(self) -> None:
        self.queued: list[bytes] = []

    def data_to_send(self) -> bytes:
        data = b"".join(self.queued)
        self.queued.clear()
        return data

    def unsend(self, data: bytes) -> None:
        self.queued.insert(0, data)


async def test_send_now_writes_at_once_and_leaves_the_rest_to_the_writer_in_order() -> None:
    """A streaming reply goes to the socket without waiting while the socket takes it; once
    the socket's buffer is full (a client that stopped reading) the rest goes back, first in
    line, to the connection's writer task: the handler never waits in a write (it could be
    cancelled half-way, and the connection's other streams would get a partial frame)."""
    listeners = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener = listeners.listeners[0]
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listeners, await anyio.connect_tcp("127.0.0.1", port) as reader:
        async with await listener.accept() as stream:  # type: ignore[attr-defined]
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            frames = _Frames()
            eager = _EagerSocket(frames, stream)
            # Two streams' replies in the same scheduling round both leave at once: the lock
            # is not held across a yield (else the second went to the writer task).
            sent: list[bool] = []

            async def reply(data: bytes) -> None:
                frames.queued.append(data)
                sent.append(await eager.send_now())

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reply, b"a" * 50)
                    nursery.start_soon(reply, b"a" * 50)
                assert sent == [True, True] and frames.queued == []
                first = b""
                while len(first) < 100:
                    first += await reader.receive()
                assert first == b"a" * 100
            big = bytes(range(256)) * 8192  # 2 MiB: far more than the socket takes
            frames.queued.append(big)
            with trio.fail_after(10):
                assert await eager.send_now()  # it did not wait
            rest = b"".join(frames.queued)
            assert 0 < len(rest) < len(big) and big.endswith(rest)
            frames.queued.append(b"later")
            received = bytearray()
            with trio.fail_after(10):
                async with eager:  # its writer task sends the rest, then what came later
                    await eager.flush()
                    while len(received) < len(big) + len(b"later"):
                        received += await reader.receive()
            assert bytes(received) == big + b"later"


def test_peers_decide_whether_commits_are_announced() -> None:
    now = [100.0]
    peers = Peers(clock=lambda: now[0])
    # No listener yet (starting, or reconnecting): announce everything.
    assert peers.present()
    peers.listening(True)
    assert not peers.present()  # alone
    assert peers.heard(HELLO) == HERE  # a process starting: answer it
    assert peers.present()
    now[0] += EXPIRY_SECONDS - 1
    assert peers.heard("") is None  # a commit
    now[0] += EXPIRY_SECONDS - 1
    assert peers.present()
    assert peers.heard(HERE) is None
    now[0] += EXPIRY_SECONDS
    assert not peers.present()  # not heard from: gone
    peers.listening(False)
    assert peers.present()
    assert EXPIRY_SECONDS > 3 * ANNOUNCE_SECONDS
    assert is_commit("") and not is_commit(HELLO) and not is_commit(HERE)


async def test_queued_request_events_are_read_without_a_yield() -> None:
    """A unary call's headers, message and end usually arrive in one read: its handler reads
    them without a round of the scheduler each, and waits only for what has not arrived."""
    connection = ServerConnection(GRPCConfiguration(client_side=False))
    stream = _EagerStream(connection, 1, None, None)
    events = [RequestReceived(1, "http", "s", "m", "application/grpc"),
              MessageReceived(1, b"x", 6), RequestEnded(1)]
    for event in events:
        stream.deliver(event)
    with trio.testing.assert_no_checkpoints():
        assert [await stream.receive_event() for _ in events] == events
    stream = _EagerStream(connection, 3, None, None)
    later = RequestEnded(3)
    got: list[object] = []

    async def receive() -> None:
        got.append(await stream.receive_event())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            stream.deliver(later)
    assert got == [later]


def test_bound_literals_refuse_what_they_cannot_write() -> None:
    """The writer's client-side binding (in the Rust extension) writes each kind of value it
    takes and refuses the rest with a Python error, never with text that means something else."""
    from datetime import UTC, datetime

    from eventstore.db.literals import bind

    assert bind("SELECT %s, %s, %s::int8[], %s, %s::text[], %s, 100%%",
                (None, -5, (1, -2), "it's \\", [], datetime(2026, 1, 1, tzinfo=UTC))) == (
        "SELECT NULL, (-5), ARRAY[1,(-2)]::int8[], E'it''s \\\\', '{}'::text[],"
        " E'2026-01-01T00:00:00+00:00'::timestamptz, 100%")
    for value, error in ((True, TypeError), (b"x", TypeError), (1.5, TypeError),
                         ("a\x00b", ValueError), (datetime(2026, 1, 1), ValueError),
                         (2**63, OverflowError), ([["ok"], [False]], TypeError)):
        with pytest.raises(error):
            bind("SELECT %s", (value,))
    for query, params in (("SELECT %s, %s", (1,)), ("SELECT %s", (1, 2)), ("SELECT %d", (1,))):
        with pytest.raises(ValueError, match="query"):
            bind(query, params)


async def test_a_send_that_empties_the_backlog_wakes_who_waits_for_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`send_now` may send the whole backlog at once, with no send of the writer task to wake
    the callers waiting for the backlog (a call about to start, a reply about to be framed):
    it wakes them itself, or they would wait with nothing owed."""
    from eventstore.grpc import transport

    monkeypatch.setattr(transport, "_MAX_UNSENT", 16 * 1024)  # the logic, not the size
    listeners = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener = listeners.listeners[0]
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listeners, await anyio.connect_tcp("127.0.0.1", port) as client:
        async with await listener.accept() as stream:  # type: ignore[attr-defined]
            connection = ServerConnection(GRPCConfiguration(client_side=False))
            eager = _EagerSocket(connection, stream)
            for _ in range(5):  # the two run in either order within a scheduling round
                connection._out += b"x" * (32 * 1024)
                woken = trio.Event()

                async def waiter(woken: trio.Event) -> None:
                    await eager.wait_backlog()
                    woken.set()

                with trio.fail_after(5):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(waiter, woken)
                        nursery.start_soon(eager.send_now)
                    await woken.wait()
                    received = 0
                    while received < 32 * 1024:
                        received += len(await client.receive())
