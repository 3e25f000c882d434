"""eventstore.client against a real server on loopback: unary calls, typed errors, transport
options (API key, TLS, timeouts), resuming subscriptions (graceful restart and SIGKILL), and
the `eventstore tail` command."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson
import pytest
import trio
from anyio.streams.tls import TLSListener
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpclib.connection import GRPCConfiguration
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.status import Status

import eventstore.client as es
from eventstore.client import (
    AlreadyExists,
    CaughtUp,
    Checkpoint,
    ClientError,
    DeadlineExceeded,
    EventStoreClient,
    ExpectedVersion,
    FailedPrecondition,
    InvalidArgument,
    NewEvent,
    NotImplementedByServer,
    ReconnectPolicy,
    RecordedEvent,
    StatusCode,
    Unavailable,
    WrongExpectedVersion,
)
from eventstore.client.errors import error_from_status
from eventstore.config import Settings
from eventstore.server import ServerInfo, serve
from eventstore.v1 import eventstore_pb2 as pb
from tests.conftest import make_settings

STREAM_TYPE = "VocabularyItem"
FAST = ReconnectPolicy(initial_backoff=0.05, max_backoff=0.5, connect_timeout=5.0)
REPO = Path(__file__).resolve().parent.parent


def sid() -> str:
    return str(uuid.uuid4())


def evs(n: int, prefix: str = "Happened", start: int = 0) -> list[NewEvent]:
    return [NewEvent(f"{prefix}{i}", {"i": i}) for i in range(start, start + n)]


@asynccontextmanager
async def connect(port: int, **kwargs: Any) -> AsyncIterator[EventStoreClient]:
    kwargs.setdefault("reconnect", FAST)
    async with EventStoreClient.connect("127.0.0.1", port, **kwargs) as client:
        yield client


async def collect(it: AsyncIterator[Any], limit: int = 100_000) -> list[Any]:
    out: list[Any] = []
    async for item in it:
        out.append(item)
        assert len(out) <= limit
    return out


def settings_on(database_url: str, port: int) -> Settings:
    return make_settings(database_url, port=port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- exports ---------------------------------------------------------------------------------


def test_exports_resolve() -> None:
    assert len(set(es.__all__)) == len(es.__all__)
    for name in es.__all__:
        assert getattr(es, name) is not None, name
    public = {n for n in vars(es) if not n.startswith("_")}
    # Everything public at the package's top level is exported (submodules aside).
    modules = {"errors", "models"}
    assert public - modules - set(es.__all__) == set()
    for name in es.__all__:
        value = getattr(es, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, ClientError), name
            assert value.__doc__ and "Raised" in value.__doc__, name


# -- unary calls -----------------------------------------------------------------------------


async def test_append_and_get_events_pages(server: ServerInfo) -> None:
    stream = sid()
    async with connect(server.port) as client:
        first = await client.append_events(
            stream, STREAM_TYPE,
            [NewEvent("Created", b'{"word": "neko"}', metadata={"by": "me"},
                      event_id=uuid.uuid4()),
             NewEvent("Renamed", {"word": "inu"}, event_id=str(uuid.uuid4()).upper())],
            expected_version=ExpectedVersion.NO_STREAM)
        assert first.next_expected_version == 2
        assert first.last_position > first.first_position > 0
        assert len(first.event_ids) == 2 and all(i == i.lower() for i in first.event_ids)
        assert first.snapshot_due is False
        more = await client.append_events(stream, STREAM_TYPE, evs(23), expected_version=2)
        assert more.next_expected_version == 25

        got = await collect(client.get_events(stream, STREAM_TYPE, page_size=4))
        assert [e.version for e in got] == list(range(1, 26))
        assert all(isinstance(e, RecordedEvent) for e in got)
        assert got[0].json() == {"word": "neko"} and got[0].metadata_json() == {"by": "me"}
        assert got[1].metadata == b"" and got[1].metadata_json() is None
        assert got[0].event_id == first.event_ids[0] and got[0].stream_id == stream
        assert got[0].stream_type == STREAM_TYPE and got[0].event_type == "Created"
        assert got[0].position == first.first_position
        assert got[0].created_at.tzinfo is not None
        assert abs(datetime.now(UTC) - got[0].created_at) < timedelta(minutes=5)
        positions = [e.position for e in got]
        assert positions == sorted(set(positions))

        window = await collect(client.get_events(stream, STREAM_TYPE, from_version=5,
                                                 to_version=13, page_size=2))
        assert [e.version for e in window] == list(range(5, 14))
        assert await collect(client.get_events(sid(), STREAM_TYPE)) == []


async def test_read_all_filters_and_pages(server: ServerInfo) -> None:
    a, b = sid(), sid()
    async with connect(server.port) as client:
        await client.append_events(a, "Order", evs(7, "OrderPlaced"))
        await client.append_events(b, "Invoice", evs(5, "InvoiceSent"))
        await client.append_events(a, "Order", evs(3, "OrderShipped"))
        everything = await collect(client.read_all(page_size=3))
        assert len(everything) == 15
        assert [e.position for e in everything] == sorted({e.position for e in everything})
        orders = await collect(client.read_all(stream_types=["Order"], page_size=4))
        assert [(e.stream_id, e.version) for e in orders] == [(a, v) for v in range(1, 11)]
        shipped = await collect(client.read_all(event_type_prefixes=["OrderShip", "Inv"],
                                                page_size=2))
        assert [e.event_type[:5] for e in shipped] == ["Invoi"] * 5 + ["Order"] * 3
        both = await collect(client.read_all(stream_types=["Invoice"],
                                             event_type_prefixes=["Order"]))
        assert both == []
        after = await collect(client.read_all(from_position=everything[9].position))
        assert after == everything[10:]


async def test_typed_errors(server: ServerInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = sid()
    async with connect(server.port) as client:
        await client.append_events(stream, STREAM_TYPE, evs(3))
        with pytest.raises(WrongExpectedVersion) as conflict:
            await client.append_events(stream, STREAM_TYPE, evs(1), expected_version=1)
        assert (conflict.value.expected, conflict.value.actual) == (1, 3)
        assert conflict.value.code == StatusCode.ABORTED
        assert conflict.value.message == "wrong expected version: expected 1, actual 3"
        # The server's trailing metadata reaches the client (not only the message).
        import eventstore.client.errors as errors

        with monkeypatch.context() as patched:
            patched.setattr(errors, "_CONFLICT", re.compile("(?!)"))
            with pytest.raises(WrongExpectedVersion) as conflict:
                await client.append_events(stream, STREAM_TYPE, evs(1), expected_version=2)
        assert (conflict.value.expected, conflict.value.actual) == (2, 3)
        with pytest.raises(WrongExpectedVersion) as conflict:
            await client.append_events(stream, STREAM_TYPE, evs(1),
                                       expected_version=ExpectedVersion.NO_STREAM)
        assert (conflict.value.expected, conflict.value.actual) == (0, 3)
        with pytest.raises(WrongExpectedVersion) as conflict:
            await client.append_events(sid(), STREAM_TYPE, evs(1),
                                       expected_version=ExpectedVersion.STREAM_EXISTS)
        assert conflict.value.actual == 0

        with pytest.raises(InvalidArgument) as bad:
            await client.append_events("not-a-uuid", STREAM_TYPE, evs(1))
        assert "stream_id" in bad.value.message and bad.value.code == StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidArgument):
            await client.append_events(stream, STREAM_TYPE, [])
        with pytest.raises(InvalidArgument):
            await collect(client.read_all(stream_types=[""]))

        event_id = uuid.uuid4()
        await client.append_events(stream, STREAM_TYPE,
                                   [NewEvent("Once", {"a": 1}, event_id=event_id)])
        with pytest.raises(AlreadyExists):
            await client.append_events(stream, STREAM_TYPE,
                                       [NewEvent("Once", {"a": 2}, event_id=event_id)])
        # A true retry returns the first result.
        again = await client.append_events(stream, STREAM_TYPE,
                                           [NewEvent("Once", {"a": 1}, event_id=event_id)],
                                           expected_version=0)
        assert again.event_ids == (str(event_id),)

        # Snapshots: none yet, then one; beyond the stream is FailedPrecondition.
        assert await client.get_snapshot(stream, STREAM_TYPE) is None
        saved = await client.save_snapshot(stream, STREAM_TYPE, 1, {"state": 1})
        loaded = await client.get_snapshot(stream, STREAM_TYPE)
        assert loaded is not None and loaded.snapshot_id == saved.snapshot_id
        with pytest.raises(FailedPrecondition):
            await client.save_snapshot(stream, STREAM_TYPE, 99, {"state": 1})

        # The connection is still good after all those errors.
        assert len(await collect(client.get_events(stream, STREAM_TYPE))) == 4


def test_client_side_argument_errors() -> None:
    from eventstore.client import _convert as convert

    with pytest.raises(TypeError):
        convert.append_request(sid(), STREAM_TYPE, [pb.NewEvent()], None)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        convert.append_request(sid(), STREAM_TYPE, evs(1), True)
    with pytest.raises(TypeError):
        convert.append_request(sid(), STREAM_TYPE, [NewEvent("X", {1, 2})], None)
    request = convert.append_request(sid(), STREAM_TYPE,
                                     [NewEvent("X", "text", metadata=bytearray(b"{}"))],
                                     ExpectedVersion.ANY)
    assert not request.HasField("expected_version")
    assert request.events[0].data == b'"text"' and request.events[0].metadata == b"{}"
    with pytest.raises(ValueError, match="jitter"):
        ReconnectPolicy(jitter=2)
    policy = ReconnectPolicy(initial_backoff=1, max_backoff=8, multiplier=2, jitter=0.5)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 8), (10_000, 8)]:
        delay = policy.delay(attempt)
        assert base * 0.5 <= delay <= base


@pytest.mark.parametrize(("code", "message", "trailers", "expected"), [
    (10, "wrong expected version: expected 4, actual 7", (), (WrongExpectedVersion, 4, 7)),
    (10, "conflict", (("expected-version", "5"), ("actual-version", "9")),
     (WrongExpectedVersion, 5, 9)),
    (10, "something else", (), (es.Aborted, None, None)),
    (3, "bad", (), (InvalidArgument, None, None)),
    (6, "dup", (), (AlreadyExists, None, None)),
    (9, "later", (), (es.FailedPrecondition, None, None)),
    (8, "big", (), (es.ResourceExhausted, None, None)),
    (16, "who", (), (es.Unauthenticated, None, None)),
    (7, "no", (), (es.PermissionDenied, None, None)),
    (14, "down", (), (Unavailable, None, None)),
    (12, "nope", (), (NotImplementedByServer, None, None)),
    (13, "oops", (), (es.InternalError, None, None)),
    (4, "slow", (), (DeadlineExceeded, None, None)),
    (1, "cancel", (), (es.Cancelled, None, None)),
    (5, "missing", (), (ClientError, None, None)),
    (99, "odd", (), (ClientError, None, None)),
])
def test_status_mapping(code: int, message: str, trailers: tuple[tuple[str, str], ...],
                        expected: tuple[type[ClientError], int | None, int | None]) -> None:
    error = error_from_status(code, message, trailers)
    cls, want_expected, want_actual = expected
    assert type(error) is cls
    assert error.message == message
    if cls is WrongExpectedVersion:
        assert isinstance(error, WrongExpectedVersion)
        assert (error.expected, error.actual) == (want_expected, want_actual)


# -- transport: a fake server that answers what a test tells it ------------------------------


@dataclass
class FakeServer:
    """A gRPC endpoint that records each request's metadata and answers with `reply`."""

    reply: Callable[[str, tuple[tuple[str, str], ...]], tuple[bytes | None, Status]]
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    trailers: list[tuple[str, str]] = field(default_factory=list)

    async def serve(self, ssl_context: ssl.SSLContext | None = None, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = int(tcp.extra(anyio.abc.SocketAttribute.local_port))
        listener: anyio.abc.Listener[Any] = tcp
        if ssl_context is not None:
            listener = TLSListener(tcp, ssl_context, standard_compatible=False)
        async with listener:
            task_status.started(self.port)
            await listener.serve(self._connection)

    async def _connection(self, byte_stream: anyio.abc.ByteStream) -> None:
        config = GRPCConfiguration(client_side=False)
        try:
            async with GRPCProtoSocket(config, byte_stream) as grpc_socket:
                async with trio.open_nursery() as nursery:
                    async for stream in grpc_socket.listen():
                        nursery.start_soon(self._request, stream)
        except Exception:
            return

    async def _request(self, stream: GRPCProtoStream) -> None:
        await stream.start_response()
        event = await stream.receive_event()
        assert isinstance(event, RequestReceived)
        await stream.receive_message()
        metadata = tuple(event.custom_metadata)
        self.seen.append((event.method_name, dict(metadata)))
        body, status = self.reply(event.method_name, metadata)
        if body is not None:
            await stream._send(body)
        await stream.close(status, custom_metadata=self.trailers)


def ok_read_all(method: str, metadata: tuple[tuple[str, str], ...]) -> tuple[bytes, Status]:
    return pb.ReadAllResponse(next_from_position=0).SerializeToString(), Status(0)


async def test_api_key_goes_with_every_call(nursery: trio.Nursery) -> None:
    fake = FakeServer(ok_read_all)
    port = await nursery.start(fake.serve)
    async with connect(port, api_key="s3cret") as client:
        assert await collect(client.read_all()) == []
        assert await collect(client.read_all(stream_types=["X"])) == []
    assert [auth.get("authorization") for _, auth in fake.seen] == ["Bearer s3cret"] * 2
    async with connect(port) as client:
        await collect(client.read_all())
    assert "authorization" not in fake.seen[-1][1]
    with pytest.raises(ValueError, match="api_key"):
        async with connect(port, api_key="two\nlines"):
            pass


async def test_unauthenticated_and_trailers(nursery: trio.Nursery) -> None:
    def answer(method: str, metadata: tuple[tuple[str, str], ...]) -> tuple[None, Status]:
        if dict(metadata).get("authorization") != "Bearer good":
            return None, Status(16, "unknown API key")
        return None, Status(10, "conflict")

    fake = FakeServer(answer)
    port = await nursery.start(fake.serve)
    async with connect(port, api_key="bad") as client:
        with pytest.raises(es.Unauthenticated, match="unknown API key"):
            await collect(client.read_all())
    async with connect(port, api_key="good") as client:
        with pytest.raises(es.Aborted) as aborted:
            await client.append_events(sid(), STREAM_TYPE, evs(1))
        assert not isinstance(aborted.value, WrongExpectedVersion)
        # The numbers come from the trailing metadata when the server sends it.
        fake.trailers = [("expected-version", "5"), ("actual-version", "9")]
        with pytest.raises(WrongExpectedVersion) as conflict:
            await client.append_events(sid(), STREAM_TYPE, evs(1))
        assert (conflict.value.expected, conflict.value.actual) == (5, 9)


async def test_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2"])
    fake = FakeServer(ok_read_all)
    port = await nursery.start(fake.serve, server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with connect(port, tls=es.tls_context(cafile=str(ca_file)), api_key="k") as client:
        assert await collect(client.read_all()) == []
    assert fake.seen[-1][1]["authorization"] == "Bearer k"
    # A server the client does not trust: the call fails as Unavailable, naming TLS.
    other = trustme.CA()
    other_file = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(other_file))
    async with connect(port, tls=es.tls_context(cafile=str(other_file))) as client:
        with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await collect(client.read_all())


async def test_mtls_refusal_is_unavailable(nursery: trio.Nursery, tmp_path: Path,
                                          database_url: str) -> None:
    """A real server that requires client certificates refuses one from another CA, or none:
    under TLS 1.3 the client learns it only during its first call. Every time, that call
    raises Unavailable and leaving the client raises nothing else (once, an ExceptionGroup
    escaped from the client when the failure met the client's own shutdown)."""
    trustme = pytest.importorskip("trustme")
    ca, other = trustme.CA(), trustme.CA()
    server_pem, ca_pem = tmp_path / "server.pem", tmp_path / "ca.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    foreign = other.issue_cert("intruder@example")
    foreign_pem = tmp_path / "foreign.pem"
    foreign.private_key_and_cert_chain_pem.write_to_path(str(foreign_pem))
    settings = make_settings(database_url, tls_cert_file=str(server_pem),
                             tls_key_file=str(server_pem), tls_client_ca_file=str(ca_pem))
    info: ServerInfo = await nursery.start(serve, settings)
    contexts = [es.tls_context(cafile=str(ca_pem)),
                es.tls_context(cafile=str(ca_pem), certfile=str(foreign_pem),
                               keyfile=str(foreign_pem))]
    for attempt in range(6):
        with trio.fail_after(20):
            async with connect(info.port, tls=contexts[attempt % 2]) as client:
                with pytest.raises(Unavailable):
                    await client.append_events(sid(), STREAM_TYPE, evs(1))
    trusted = ca.issue_cert("client@example", common_name="client")
    trusted_pem = tmp_path / "client.pem"
    trusted.private_key_and_cert_chain_pem.write_to_path(str(trusted_pem))
    async with connect(info.port, tls=es.tls_context(cafile=str(ca_pem),
                                                     certfile=str(trusted_pem),
                                                     keyfile=str(trusted_pem))) as client:
        await client.append_events(sid(), STREAM_TYPE, evs(1))


async def test_unreachable_and_timeout(nursery: trio.Nursery) -> None:
    port = free_port()
    async with connect(port) as client:
        with pytest.raises(Unavailable, match=f"127.0.0.1:{port}"):
            await client.append_events(sid(), STREAM_TYPE, evs(1))

    async def silent(stream: anyio.abc.ByteStream) -> None:
        await trio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    quiet_port = int(listener.extra(anyio.abc.SocketAttribute.local_port))

    async def serve_silently() -> None:
        async with listener:
            await listener.serve(silent)

    nursery.start_soon(serve_silently)
    async with connect(quiet_port, timeout=0.3) as client:
        with trio.fail_after(5), pytest.raises(DeadlineExceeded, match="AppendEvents"):
            await client.append_events(sid(), STREAM_TYPE, evs(1))
    nursery.cancel_scope.cancel()


class RestartableServer:
    """`serve` in a nursery: stop it (gracefully) and start it again on the same port."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.port = 0
        self._shutdown = trio.Event()
        self._done = trio.Event()

    async def start(self, nursery: trio.Nursery) -> ServerInfo:
        self._shutdown, self._done = trio.Event(), trio.Event()
        info: ServerInfo = await nursery.start(self._run)
        self.port = info.port
        return info

    async def _run(self, *, task_status: trio.TaskStatus[ServerInfo]) -> None:
        try:
            await serve(settings_on(self.database_url, self.port),
                        shutdown=self._shutdown, task_status=task_status)
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._shutdown.set()
        with trio.fail_after(15):
            await self._done.wait()


async def test_calls_survive_a_server_restart(database_url: str, nursery: trio.Nursery) -> None:
    """A lost shared connection is dialed again by the next call. The stopped server leaves
    its sockets open (see the report), so the call in between hears nothing: the keepalive
    ping finds that out."""
    restartable = RestartableServer(database_url)
    await restartable.start(nursery)
    async with connect(restartable.port, keepalive=0.5) as client:
        stream = sid()
        await client.append_events(stream, STREAM_TYPE, evs(2))
        await restartable.stop()
        with trio.fail_after(5), pytest.raises(Unavailable):
            await client.append_events(stream, STREAM_TYPE, evs(1))
        await restartable.start(nursery)
        with trio.fail_after(10):
            await client.append_events(stream, STREAM_TYPE, evs(1), expected_version=2)
            got = await collect(client.get_events(stream, STREAM_TYPE))
        assert [e.version for e in got] == [1, 2, 3]
    await restartable.stop()



# -- subscriptions ---------------------------------------------------------------------------


async def take(subscription: es.Subscription, n: int, *, seconds: float = 15,
               keep: tuple[type, ...] = (RecordedEvent, CaughtUp)) -> list[Any]:
    """The next `n` items of the kinds in `keep` (others are skipped), within `seconds`."""
    out: list[Any] = []
    with trio.fail_after(seconds):
        while len(out) < n:
            item = await subscription.__anext__()
            if isinstance(item, keep):
                out.append(item)
    return out


async def eventually(predicate: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until `predicate()` holds (polling: it watches state that has no event)."""
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


def positions(items: list[Any]) -> list[int]:
    return [i.position for i in items if isinstance(i, RecordedEvent)]


async def test_subscribe_to_all_catches_up_then_goes_live(server: ServerInfo) -> None:
    a, b = sid(), sid()
    async with connect(server.port) as client:
        await client.append_events(a, "Order", evs(5))
        await client.append_events(b, "Invoice", evs(3))
        history = await collect(client.read_all())
        async with client.subscribe_to_all() as subscription:
            items = await take(subscription, 9)
            assert items[:8] == history
            assert isinstance(items[8], CaughtUp)
            assert items[8].position >= history[-1].position
            assert subscription.caught_up and subscription.position >= history[-1].position
            live = await client.append_events(a, "Order", evs(2, start=5))
            items = await take(subscription, 2)
            assert positions(items) == [live.first_position, live.last_position]
            assert [e.version for e in items] == [6, 7]
            assert subscription.reconnects == 0


async def test_checkpoints_on_an_idle_store(server: ServerInfo) -> None:
    async with connect(server.port) as client:
        appended = await client.append_events(sid(), STREAM_TYPE, evs(1))
        async with client.subscribe_to_all(checkpoint_interval_ms=100) as subscription:
            items = await take(subscription, 2)
            assert isinstance(items[1], CaughtUp)
            start = trio.current_time()
            checkpoints = await take(subscription, 4, seconds=5, keep=(Checkpoint, RecordedEvent))
            assert all(isinstance(c, Checkpoint) for c in checkpoints)
            assert {c.position for c in checkpoints} == {appended.last_position}
            assert trio.current_time() - start < 3
        # An empty store checkpoints too (position 0).
        async with client.subscribe_to_all(stream_types=["Nothing"],
                                           checkpoint_interval_ms=100) as subscription:
            items = await take(subscription, 3, keep=(Checkpoint, CaughtUp, RecordedEvent))
            assert not any(isinstance(i, RecordedEvent) for i in items)
            assert any(isinstance(i, Checkpoint) for i in items)


async def test_batches_are_flattened(server: ServerInfo) -> None:
    stream = sid()
    async with connect(server.port) as client:
        await client.append_events(stream, STREAM_TYPE, evs(50))
        async with client.subscribe_to_all(max_batch_size=16) as subscription:
            items = await take(subscription, 51)
            assert [e.version for e in items[:50]] == list(range(1, 51))
            assert isinstance(items[50], CaughtUp)
            await client.append_events(stream, STREAM_TYPE, evs(30))
            items = await take(subscription, 30)
            assert [e.version for e in items] == list(range(51, 81))
        async with client.subscribe_to_stream(STREAM_TYPE, stream, from_version=70,
                                              max_batch_size=4) as subscription:
            items = await take(subscription, 11)
            assert [e.version for e in items[:10]] == list(range(71, 81))
            assert isinstance(items[10], CaughtUp)


async def test_subscription_filters(server: ServerInfo) -> None:
    a, b, c = sid(), sid(), sid()
    async with connect(server.port) as client:
        await client.append_events(a, "Order", evs(4, "OrderPlaced"))
        await client.append_events(b, "Invoice", evs(2, "InvoiceSent"))
        await client.append_events(c, "Order", evs(3, "OrderShipped"))
        await client.append_events(a, "Order", evs(2, "OrderShipped"))

        async with client.subscribe_to_all(stream_types=["Order"],
                                           event_type_prefixes=["OrderShip"]) as all_shipped:
            items = await take(all_shipped, 6)
            assert [(e.stream_id, e.version) for e in items[:5]] == [
                (c, 1), (c, 2), (c, 3), (a, 5), (a, 6)]
            assert isinstance(items[5], CaughtUp)

        async with client.subscribe_to_stream("Order") as orders:
            items = await take(orders, 10)
            assert [e.stream_type for e in items[:9]] == ["Order"] * 9
            assert isinstance(items[9], CaughtUp)

        async with client.subscribe_to_stream("Order", a, from_version=3) as one:
            items = await take(one, 4)
            assert [(e.stream_id, e.version) for e in items[:3]] == [(a, 4), (a, 5), (a, 6)]
            assert isinstance(items[3], CaughtUp)
            await client.append_events(c, "Order", evs(1))
            await client.append_events(a, "Order", evs(1))
            items = await take(one, 1)
            assert (items[0].stream_id, items[0].version) == (a, 7)

        async with client.subscribe_to_all(include_existing=False) as fresh:
            first = await take(fresh, 1)
            assert isinstance(first[0], CaughtUp)
            head = [e async for e in client.read_all()][-1].position
            assert first[0].position == head
            new = await client.append_events(b, "Invoice", evs(1))
            items = await take(fresh, 1)
            assert positions(items) == [new.last_position]


async def test_subscription_errors_end_it(server: ServerInfo) -> None:
    async with connect(server.port) as client:
        subscription = client.subscribe_to_all(stream_types=[""])
        with trio.fail_after(10), pytest.raises(InvalidArgument, match="stream_types"):
            await subscription.__anext__()
        with pytest.raises(StopAsyncIteration):
            await subscription.__anext__()
        async with client.subscribe_to_stream(STREAM_TYPE, "not-a-uuid") as bad:
            with trio.fail_after(10), pytest.raises(InvalidArgument, match="stream_id"):
                await collect(bad)
        async with client.subscribe_to_stream(STREAM_TYPE, sid(), from_position=3) as bad:
            with trio.fail_after(10), pytest.raises(InvalidArgument, match="from_position"):
                await collect(bad)


async def test_closing_a_subscription_closes_its_call(server: ServerInfo) -> None:
    feed = server.feed
    assert feed is not None
    async with connect(server.port) as client:
        async with client.subscribe_to_all(checkpoint_interval_ms=50) as subscription:
            await take(subscription, 1)
            assert feed.subscribers == 1
        await eventually(lambda: feed.subscribers == 0)
        # A subscription left open closes with the client.
        subscription = client.subscribe_to_all(checkpoint_interval_ms=50)
        await take(subscription, 1)
        assert feed.subscribers == 1
    await eventually(lambda: feed.subscribers == 0)


async def test_gives_up_after_max_attempts() -> None:
    policy = ReconnectPolicy(initial_backoff=0.01, max_backoff=0.02, max_attempts=2)
    async with connect(free_port(), reconnect=policy) as client:
        subscription = client.subscribe_to_all()
        with trio.fail_after(10), pytest.raises(Unavailable, match="gave up after 3"):
            await subscription.__anext__()
        with pytest.raises(StopAsyncIteration):
            await subscription.__anext__()


async def test_a_silent_server_is_detected(nursery: trio.Nursery) -> None:
    """A peer that accepts but never answers: the idle timeout ends each call."""
    accepted = 0

    async def silent(stream: anyio.abc.ByteStream) -> None:
        nonlocal accepted
        accepted += 1
        await trio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = int(listener.extra(anyio.abc.SocketAttribute.local_port))

    async def serve_silently() -> None:
        async with listener:
            await listener.serve(silent)

    nursery.start_soon(serve_silently)
    policy = ReconnectPolicy(initial_backoff=0.01, max_attempts=1, idle_timeout=0.2)
    async with connect(port, reconnect=policy) as client:
        with trio.fail_after(10), pytest.raises(Unavailable, match="nothing from"):
            await client.subscribe_to_all().__anext__()
    assert accepted == 2
    nursery.cancel_scope.cancel()


@dataclass
class Consumer:
    """Collects a subscription's events in a task; `wait_for(n)` waits until it has n."""

    subscription: es.Subscription
    events: list[RecordedEvent] = field(default_factory=list)
    caught_up: int = 0
    _grew: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        async with self.subscription:
            async for item in self.subscription:
                if isinstance(item, RecordedEvent):
                    self.events.append(item)
                elif isinstance(item, CaughtUp):
                    self.caught_up += 1
                self._grew.set()
                self._grew = trio.Event()

    async def wait_for(self, n: int, seconds: float = 30) -> None:
        with trio.fail_after(seconds):
            while len(self.events) < n:
                await self._grew.wait()


def assert_exactly(received: list[RecordedEvent], expected: list[RecordedEvent]) -> None:
    got = [e.position for e in received]
    assert len(got) == len(set(got)), "duplicates"
    assert got == sorted(got), "out of order"
    assert got == [e.position for e in expected], "gap or extra event"
    assert received == expected


@pytest.mark.slow
async def test_subscriptions_resume_after_a_server_restart(
        database_url: str, server: ServerInfo, nursery: trio.Nursery) -> None:
    """Subscribed to server A while B (same database) takes the writes; A stops (its
    subscriptions end with UNAVAILABLE) and starts again on the same port; every subscriber
    ends with the complete ordered sequence, once, and CaughtUp once."""
    a = RestartableServer(database_url)
    await a.start(nursery)
    order, quiet = sid(), sid()
    async with connect(a.port) as reader, connect(server.port) as writer:
        await writer.append_events(order, "Order", evs(3))
        await writer.append_events(quiet, "Order", evs(2))
        consumers = [
            Consumer(reader.subscribe_to_all(checkpoint_interval_ms=100)),
            Consumer(reader.subscribe_to_all(stream_types=["Order"], max_batch_size=5)),
            Consumer(reader.subscribe_to_stream("Order")),
            Consumer(reader.subscribe_to_stream("Order", order, from_version=1)),
            Consumer(reader.subscribe_to_all(include_existing=False)),
            # Nothing for it before the restart: it resumes from its CaughtUp alone.
            Consumer(reader.subscribe_to_stream("Order", quiet, include_existing=False)),
        ]
        async with trio.open_nursery() as consumers_nursery:
            for consumer in consumers:
                consumers_nursery.start_soon(consumer.run)
            await consumers[0].wait_for(5)
            # Wait until the live-only subscribers are anchored.
            await eventually(lambda: consumers[4].caught_up == consumers[5].caught_up == 1)

            async def write(n: int) -> None:
                for i in range(n):
                    await writer.append_events(order, "Order", evs(1, "OrderStep", i))
                    await writer.append_events(sid(), "Invoice", evs(2, "InvoiceSent"))

            await write(5)
            await consumers[0].wait_for(5 + 15)
            await a.stop()
            await write(5)  # while A is down
            await writer.append_events(quiet, "Order", evs(2))
            await trio.sleep(0.3)
            await a.start(nursery)
            await write(5)
            await writer.append_events(quiet, "Order", evs(1))
            everything = await collect(writer.read_all())
            orders = [e for e in everything if e.stream_type == "Order"]
            expected = [everything, orders, orders,
                        [e for e in orders if e.stream_id == order and e.version > 1],
                        everything[5:],
                        [e for e in orders if e.stream_id == quiet and e.version > 2]]
            for consumer, want in zip(consumers, expected, strict=True):
                await consumer.wait_for(len(want))
            await trio.sleep(0.3)  # anything extra would arrive now
            consumers_nursery.cancel_scope.cancel()
        for consumer, want in zip(consumers, expected, strict=True):
            assert_exactly(consumer.events, want)
            assert consumer.caught_up == 1
            assert consumer.subscription.reconnects >= 1
    await a.stop()


@dataclass
class ServerProcess:
    """`python -m eventstore serve` in a subprocess, on a fixed port."""

    database_url: str
    port: int
    log: Path
    process: trio.Process | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        env = dict(os.environ, DATABASE_URL=self.database_url, PORT=str(self.port),
                   HOST="127.0.0.1", HTTP_PORT=str(free_port()), LOG_FORMAT="json",
                   LOG_LEVEL="INFO")
        self.log.write_bytes(b"")
        with self.log.open("ab") as err:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "eventstore", "serve"], env=env, cwd=REPO,
                stdout=subprocess.DEVNULL, stderr=err)
        with trio.fail_after(60):
            while True:
                for line in self.log.read_bytes().splitlines():
                    try:
                        entry = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if entry.get("msg") == "eventstore listening":
                        assert entry["grpc_port"] == self.port
                        return
                assert self.process.poll() is None, self.log.read_text()
                await trio.sleep(0.05)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with trio.fail_after(15):
                await self.process.wait()


@pytest.mark.slow
async def test_subscription_resumes_after_sigkill(
        database_url: str, server: ServerInfo, nursery: trio.Nursery, tmp_path: Path) -> None:
    """A server process is SIGKILLed mid-subscription while a writer keeps appending through
    another server; it comes back on the same port; the subscriber resumes, no gap, no
    duplicate."""
    killed = ServerProcess(database_url, free_port(), tmp_path / "server.log")
    await killed.start(nursery)
    try:
        async with connect(killed.port) as reader, connect(server.port) as writer:
            consumer = Consumer(reader.subscribe_to_all(max_batch_size=10))
            single = sid()
            by_version = Consumer(reader.subscribe_to_stream(STREAM_TYPE, single))
            stop_writing = trio.Event()
            written = 0

            async def keep_writing() -> None:
                nonlocal written
                while not stop_writing.is_set():
                    await writer.append_events(single, STREAM_TYPE, evs(1))
                    await writer.append_events(sid(), STREAM_TYPE, evs(2))
                    written += 3
                    await trio.sleep(0.005)

            async with trio.open_nursery() as inner:
                inner.start_soon(consumer.run)
                inner.start_soon(by_version.run)
                inner.start_soon(keep_writing)
                await consumer.wait_for(60)
                await killed.kill()
                at_kill = written
                await eventually(lambda: written >= at_kill + 60)
                await killed.start(nursery)
                await consumer.wait_for(written + 60)
                stop_writing.set()
                await eventually(lambda: written % 3 == 0)
                await trio.sleep(0.1)
                everything = await collect(writer.read_all())
                stream_events = [e for e in everything if e.stream_id == single]
                await consumer.wait_for(len(everything))
                await by_version.wait_for(len(stream_events))
                await trio.sleep(0.3)
                inner.cancel_scope.cancel()
            assert_exactly(consumer.events, everything)
            assert_exactly(by_version.events, stream_events)
            assert consumer.subscription.reconnects >= 1
            assert by_version.subscription.reconnects >= 1
            assert consumer.caught_up == by_version.caught_up == 1
    finally:
        await killed.stop()


# -- eventstore tail -------------------------------------------------------------------------


async def test_tail_command(server: ServerInfo) -> None:
    a, b = sid(), sid()
    async with connect(server.port) as client:
        await client.append_events(a, "Order", [
            NewEvent("OrderPlaced", {"n": i}, metadata={"user": "u"}) for i in range(4)])
        await client.append_events(b, "Invoice", evs(3))
        await client.append_events(a, "Order", [NewEvent("OrderShipped", [1, "two", None])])
        orders = await collect(client.read_all(stream_types=["Order"]))

    async def tail(*args: str) -> list[dict[str, Any]]:
        env = dict(os.environ, PORT=str(server.port))
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, "-m", "eventstore", "tail", *args], env=env, cwd=REPO,
                capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr.decode()
        return [orjson.loads(line) for line in done.stdout.splitlines()]

    lines = await tail("--count", "5", "--stream-type", "Order")
    assert [line["position"] for line in lines] == [e.position for e in orders]
    first = lines[0]
    assert set(first) == {"event_id", "stream_id", "stream_type", "version", "event_type",
                          "position", "created_at", "data", "metadata"}
    assert (first["stream_id"], first["stream_type"], first["version"]) == (a, "Order", 1)
    assert first["event_id"] == orders[0].event_id
    assert first["data"] == {"n": 0} and first["metadata"] == {"user": "u"}
    assert datetime.fromisoformat(first["created_at"]) == orders[0].created_at
    assert lines[4]["data"] == [1, "two", None] and lines[4]["metadata"] is None

    lines = await tail("--count", "2", "--from-position", str(orders[1].position),
                       "--event-type-prefix", "OrderPl", "--port", str(server.port))
    assert [line["position"] for line in lines] == [e.position for e in orders[2:4]]


async def test_tail_follows_live_until_interrupted(server: ServerInfo) -> None:
    async with connect(server.port) as client:
        before = await client.append_events(sid(), "Order", evs(3))
        env = dict(os.environ, PORT=str(server.port))
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "eventstore", "tail", "--no-existing"], env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert process.stdout is not None
            output = b""
            appended: list[int] = []
            with trio.fail_after(30):
                while b"\n" not in output:
                    # Until tail has subscribed, appends go unseen: keep appending.
                    appended.append((await client.append_events(
                        sid(), "Order", [NewEvent("Live", {"n": len(appended)})])).last_position)
                    with trio.move_on_after(0.2):
                        output += await process.stdout.receive_some()
            line = orjson.loads(output.split(b"\n")[0])
            assert line["position"] in appended and line["position"] > before.last_position
            assert line["event_type"] == "Live"
            process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
