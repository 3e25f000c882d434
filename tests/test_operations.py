"""The operations surface: /health/live, /health/ready, /metrics, grpc.health.v1.Health, and
readiness through a database outage."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import psycopg
import pytest
import trio

from eventstore.client import EventStoreClient, NewEvent, RecordedEvent, Unavailable
from eventstore.embedded import EmbeddedPostgres
from eventstore.server import ServerInfo, serve
from tests.conftest import make_settings
from tests.helpers import get, health_check, until_the_append_lock_is_awaited


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            return float(value)
    return 0.0


async def test_liveness_and_readiness(server: ServerInfo) -> None:
    assert server.http_port
    status, body, kind = await get(server.http_port, "/health/live")
    assert status == 200 and orjson.loads(body) == {"status": "live"}
    assert kind == "application/json"
    status, body, _ = await get(server.http_port, "/health/ready")
    ready = orjson.loads(body)
    assert status == 200 and ready["status"] == "ready"
    assert ready["database"] and ready["migrations_applied"] and not ready["draining"]
    assert "open" in ready["authentication"]
    status, _, _ = await get(server.http_port, "/nope")
    assert status == 404


async def test_metrics_move_with_real_traffic(server: ServerInfo) -> None:
    assert server.http_port
    _, before, kind = await get(server.http_port, "/metrics")
    assert kind.startswith("text/plain")
    stream = str(uuid.uuid4())
    async with EventStoreClient.connect("127.0.0.1", server.port) as client:
        await client.append_events(stream, "Deck", [NewEvent("Added", {"n": i})
                                                    for i in range(5)])
        await client.append_events(stream, "Deck", [NewEvent("Added", {})], expected_version=5)
        with pytest.raises(Exception, match="wrong expected version"):
            await client.append_events(stream, "Deck", [NewEvent("Added", {})],
                                       expected_version=1)
        await client.save_snapshot(stream, "Deck", 6, {"cards": 6})
        async with client.subscribe_to_all() as subscription:
            async for _item in subscription:
                break
            _, during, _ = await get(server.http_port, "/metrics")
    _, after, _ = await get(server.http_port, "/metrics")
    text = after.decode()
    assert metric(text, "eventstore_events_appended_total") - metric(
        before.decode(), "eventstore_events_appended_total") == 6
    assert metric(text, "eventstore_append_requests_total", outcome="ok") >= 2
    assert metric(text, "eventstore_append_requests_total",
                  outcome="WrongExpectedVersion") == 1
    assert metric(text, "eventstore_grpc_request_duration_seconds_count",
                  method="AppendEvents", code="OK") >= 2
    assert metric(text, "eventstore_grpc_request_duration_seconds_count",
                  method="AppendEvents", code="ABORTED") == 1
    assert metric(text, "eventstore_append_batch_events_count") >= 2
    assert metric(text, "eventstore_append_commit_seconds_count") >= 2
    assert metric(text, "eventstore_snapshots_saved_total") == 1
    assert metric(text, "eventstore_events") >= 6
    assert metric(during.decode(), "eventstore_subscriptions_open") == 1
    assert metric(text, "eventstore_database_up") == 1


async def test_grpc_health_check(server: ServerInfo) -> None:
    assert await trio.to_thread.run_sync(health_check, server.port) == 1  # SERVING
    assert await trio.to_thread.run_sync(
        health_check, server.port, "eventstore.v1.EventStoreService") == 1
    # The health checking protocol: Check of an unknown service ends NOT_FOUND.
    with pytest.raises(grpc.RpcError) as err:
        await trio.to_thread.run_sync(health_check, server.port, "other.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert '"other.Service" is not served here' in err.value.details()  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_readiness_checks_reuse_one_connection(nursery: trio.Nursery,
                                                     database_url: str) -> None:
    """The readiness check runs every HEALTH_CHECK_INTERVAL_MS on a kept connection: twenty
    checks open no new PostgreSQL sessions (they used to open one each)."""
    settings = make_settings(database_url, health_check_interval_ms=50)
    await nursery.start(serve, settings)

    def sessions() -> int:
        with psycopg.connect(database_url, autocommit=True) as conn:
            row = conn.execute("SELECT sessions FROM pg_stat_database"
                               " WHERE datname = current_database()").fetchone()
            conn.execute("SELECT pg_stat_clear_snapshot()")
        assert row is not None
        return int(row[0])

    await trio.sleep(0.5)  # start-up connections are made by now
    before = await trio.to_thread.run_sync(sessions)
    await trio.sleep(1.0)
    after = await trio.to_thread.run_sync(sessions)
    # The two probes above are one session each; nothing else should connect while idle.
    assert after - before <= 3, f"{after - before} sessions opened in 20 check intervals"


async def test_database_outage_is_reported_and_recovers_by_itself(
        nursery: trio.Nursery, private_pg: tuple[EmbeddedPostgres, str]) -> None:
    pg, url = private_pg
    settings = make_settings(url, health_check_interval_ms=100, writer_retry_seconds=0.5)
    info: Any = await nursery.start(serve, settings)

    async def wait_ready(expected: int) -> dict[str, Any]:
        with trio.fail_after(20):
            while True:
                status, body, _ = await get(info.http_port, "/health/ready")
                if status == expected:
                    return dict(orjson.loads(body))
                await trio.sleep(0.05)

    await wait_ready(200)
    await trio.to_thread.run_sync(pg.stop)
    down = await wait_ready(503)
    assert down["status"] == "not ready" and "database unreachable" in down["reason"]
    assert await trio.to_thread.run_sync(health_check, info.port) == 2  # NOT_SERVING
    status, _, _ = await get(info.http_port, "/health/live")
    assert status == 200  # alive, just not ready
    async with EventStoreClient.connect("127.0.0.1", info.port) as client:
        with pytest.raises(Unavailable):
            await client.append_events(str(uuid.uuid4()), "Deck", [NewEvent("Added", {})])
        await trio.to_thread.run_sync(pg.start)
        await wait_ready(200)
        assert await trio.to_thread.run_sync(health_check, info.port) == 1
        result = await client.append_events(str(uuid.uuid4()), "Deck",
                                            [NewEvent("Added", {})])
        assert result.next_expected_version == 1


@contextlib.contextmanager
def _audit_line() -> Iterator[trio.Event]:
    """An event set when the next audit line is written (the server runs in the test's event
    loop: same thread)."""
    audited = trio.Event()

    class Audited(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            audited.set()

    audit_log = logging.getLogger("eventstore.audit")
    audit_log.addHandler(handler := Audited())
    try:
        yield audited
    finally:
        audit_log.removeHandler(handler)


async def _audited_and_stored(audited: trio.Event, caplog: pytest.LogCaptureFixture,
                              port: int, stream: str) -> list[RecordedEvent]:
    """Wait for the audit line of the two-event append to `stream` (Deck), check it, and
    return what the stream holds."""
    with trio.fail_after(10):
        await audited.wait()
    (record,) = [r for r in caplog.records if r.name == "eventstore.audit"]
    assert (record.operation, record.outcome, record.stream_id, record.event_count) == (
        "append", "ok", stream, 2)
    async with EventStoreClient.connect("127.0.0.1", port) as reader:
        return [event async for event in reader.get_events(stream, "Deck")]


async def test_an_append_whose_client_leaves_mid_commit_is_stored_and_audited(
        server: ServerInfo, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The client's connection ends while its append waits for the commit (here: behind the
    append lock, held by another session). The append is still committed, and its audit line
    is written: a stored write is never missing from the audit log."""
    import struct

    import h2.config
    import h2.connection

    from eventstore.store.writer import APPEND_LOCK_KEY
    from eventstore.v1 import eventstore_pb2 as pb
    from tests.helpers import events

    caplog.set_level("INFO", logger="eventstore.audit")
    stream = str(uuid.uuid4())
    body = pb.AppendEventsRequest(stream_id=stream, stream_type="Deck",
                                  events=events(2)).SerializeToString()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"),
                            (":path", "/eventstore.v1.EventStoreService/AppendEvents"),
                            (":authority", "127.0.0.1"), ("content-type", "application/grpc"),
                            ("te", "trailers")])
    client.send_data(1, struct.pack(">?I", False, len(body)) + body, end_stream=True)
    with _audit_line() as audited:
        with psycopg.connect(database_url) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,))
            sock = await trio.open_tcp_stream("127.0.0.1", server.port)
            await sock.send_all(client.data_to_send())
            await until_the_append_lock_is_awaited(database_url)
            await sock.aclose()  # the client goes; the server cancels what waits for it
            await trio.sleep(0.3)
            holder.rollback()  # the lock goes
        stored = await _audited_and_stored(audited, caplog, server.port, stream)
    assert len(stored) == 2


async def test_every_write_is_audited(server: ServerInfo,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="eventstore.audit")
    stream = str(uuid.uuid4())
    async with EventStoreClient.connect("127.0.0.1", server.port) as client:
        await client.append_events(stream, "Deck", [NewEvent("Added", {"secret": "s3cr3t"})] * 3)
        with pytest.raises(Exception, match="wrong expected version"):
            await client.append_events(stream, "Deck", [NewEvent("Added", {})],
                                       expected_version=0)
        await client.save_snapshot(stream, "Deck", 3, {"cards": 3})
    records = [r for r in caplog.records if r.name == "eventstore.audit"]
    fields = [{k: getattr(r, k, None) for k in (
        "operation", "caller", "peer", "outcome", "stream_id", "first_version", "last_version",
        "first_position", "last_position", "event_count", "version", "duration_ms")}
        for r in records]
    ok, conflict, snapshot = fields
    assert ok["operation"] == "append" and ok["outcome"] == "ok"
    assert ok["stream_id"] == stream and ok["event_count"] == 3
    assert (ok["first_version"], ok["last_version"]) == (1, 3)
    assert ok["last_position"] - ok["first_position"] == 2
    # Open mode: no credentials identify the caller; its address is there beside the name.
    assert ok["caller"] == "anonymous" and ok["duration_ms"] >= 0
    assert str(ok["peer"]).startswith("127.0.0.1:")
    assert conflict["outcome"] == "WrongExpectedVersion" and conflict["stream_id"] == stream
    assert snapshot["operation"] == "snapshot_save" and snapshot["version"] == 3
    assert all("s3cr3t" not in r.getMessage() and "s3cr3t" not in str(vars(r))
               for r in records)


async def test_writes_the_transport_refuses_are_audited(
        nursery: trio.Nursery, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A write answered before its handler runs — over the request size limit, over the
    transport's limit once decompressed, not there in time — still gets its audit line
    (README: every write, refused writes included). Reads refused so get none."""
    from eventstore.v1 import eventstore_pb2 as pb

    caplog.set_level("INFO", logger="eventstore.audit")
    settings = make_settings(database_url, max_request_bytes=64 * 1024, request_read_seconds=0.5)
    info: ServerInfo = await nursery.start(lambda task_status: serve(
        settings, task_status=task_status))
    stream = str(uuid.uuid4())
    big = pb.NewEvent(event_type="Big", data=orjson.dumps({"x": "y" * (100 * 1024)}))
    service = "/eventstore.v1.EventStoreService/"

    def refused(method: str, request: Any, **options: Any) -> tuple[str, str]:
        with grpc.insecure_channel(f"127.0.0.1:{info.port}") as channel:
            call = channel.unary_unary(service + method,
                                       request_serializer=lambda m: m.SerializeToString())
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30, **options)
        return err.value.code().name, err.value.details()  # type: ignore[attr-defined]

    over = await trio.to_thread.run_sync(lambda: refused("AppendEvents", pb.AppendEventsRequest(
        stream_id=stream, stream_type="Deck", events=[big])))
    assert over[0] == "RESOURCE_EXHAUSTED" and "over the limit of 65536" in over[1]
    # 33 MiB once decompressed: the connection itself refuses it, whatever the setting.
    bomb = pb.SaveSnapshotRequest(stream_id=stream, stream_type="Deck", version=1,
                                  data=b'"' + b"z" * (33 << 20) + b'"')
    unread = await trio.to_thread.run_sync(lambda: refused(
        "SaveSnapshot", bomb, compression=grpc.Compression.Gzip))
    assert unread[0] == "RESOURCE_EXHAUSTED" and "decompresses to over" in unread[1]
    read = await trio.to_thread.run_sync(lambda: refused("GetEvents", pb.GetEventsRequest(
        stream_id=stream, stream_type="D" * (70 * 1024))))
    assert read[0] == "RESOURCE_EXHAUSTED" and "over the limit of 65536" in read[1]
    records = [r for r in caplog.records if r.name == "eventstore.audit"]
    assert [(r.operation, r.outcome, r.caller, r.reason) for r in records] == [  # type: ignore[attr-defined]
        ("append", "LimitExceeded", "anonymous", over[1]),
        ("snapshot_save", "LimitExceeded", "anonymous", unread[1]),
    ]
    assert all(str(r.peer).startswith("127.0.0.1:") and r.duration_ms >= 0  # type: ignore[attr-defined]
               for r in records)


@pytest.mark.slow
async def test_graceful_shutdown_answers_in_flight_appends(
        nursery: trio.Nursery, database_url: str) -> None:
    """Appends racing a shutdown each get their true outcome: acknowledged and stored, or
    UNAVAILABLE and not stored; the server then stops by itself."""
    shutdown = trio.Event()
    stopped = trio.Event()

    async def run_server(*, task_status: trio.TaskStatus[ServerInfo]) -> None:
        await serve(make_settings(database_url), shutdown=shutdown, task_status=task_status)
        stopped.set()

    info: ServerInfo = await nursery.start(run_server)
    acked: list[str] = []
    refused: list[str] = []

    async def writer(n: int) -> None:
        async with EventStoreClient.connect("127.0.0.1", info.port) as client:
            for i in range(40):
                event_id = str(uuid.uuid4())
                try:
                    await client.append_events(str(uuid.uuid4()), "Deck",
                                               [NewEvent("Added", {"n": n, "i": i},
                                                         event_id=event_id)])
                    acked.append(event_id)
                except Unavailable:
                    refused.append(event_id)
                    return

    with trio.fail_after(30):
        async with trio.open_nursery() as writers:
            for n in range(8):
                writers.start_soon(writer, n)
            await trio.sleep(0.3)
            shutdown.set()
        await stopped.wait()
    import psycopg

    with psycopg.connect(database_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT event_id::text FROM events")}
    assert acked and set(acked) <= stored
    assert not set(refused) & stored


async def test_grpc_health_watch_follows_readiness(server: ServerInfo) -> None:
    def first_status(service: bytes = b"") -> int:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                         request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)
            call = watch(b"\x0a" + bytes([len(service)]) + service if service else b"",
                         timeout=10)
            try:
                reply: bytes = next(iter(call))
            finally:
                call.cancel()
        return reply[1]

    assert await trio.to_thread.run_sync(first_status) == 1  # SERVING
    # Watch of an unknown service says so, and would go on (the protocol).
    assert await trio.to_thread.run_sync(first_status, b"other.Service") == 3  # SERVICE_UNKNOWN


async def test_an_append_past_its_deadline_is_still_stored_and_audited(
        server: ServerInfo, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A client's deadline (grpcio's timeout) passes while its append waits behind the append
    lock: the client hears DEADLINE_EXCEEDED, and the append, once queued, is committed all the
    same and audited — the outcome a client that gave up must learn by retrying with the same
    event ids."""
    import grpc

    from eventstore.store.writer import APPEND_LOCK_KEY
    from eventstore.v1 import eventstore_pb2 as pb
    from tests.helpers import append_request, events

    caplog.set_level("INFO", logger="eventstore.audit")
    stream = str(uuid.uuid4())
    request = append_request(stream, events(2, with_ids=True), None, stream_type="Deck")

    def append_with_deadline() -> str:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            rpc = channel.unary_unary(
                "/eventstore.v1.EventStoreService/AppendEvents",
                request_serializer=pb.AppendEventsRequest.SerializeToString,
                response_deserializer=pb.AppendEventsResponse.FromString)
            try:
                rpc(request, timeout=0.5)
            except grpc.RpcError as exc:
                return str(exc.code().name)  # type: ignore[attr-defined]
            return "OK"

    with _audit_line() as audited:
        with psycopg.connect(database_url) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,))
            assert await trio.to_thread.run_sync(append_with_deadline) == "DEADLINE_EXCEEDED"
            holder.rollback()  # the lock goes
        stored = await _audited_and_stored(audited, caplog, server.port, stream)
    assert [e.event_id for e in stored] == [e.event_id for e in request.events]
    async with EventStoreClient.connect("127.0.0.1", server.port) as client:
        # The client's retry with the same ids learns the outcome: its original result.
        retried = await client.append_events(stream, "Deck", [
            NewEvent(e.event_type, {"i": i}, event_id=e.event_id)
            for i, e in enumerate(request.events)])
        assert retried.next_expected_version == 2
