"""Core throughput benchmark: appends and GetEvents, next to PostgreSQL's own rates.

    python benches/core.py [--quick] [--out results.json]

Starts its own PostgreSQL (embedded, durable settings) and the server as a separate process, as
in production, then measures in one run:

- appends/s at batch sizes 1, 10, 100 with 1 and 16 concurrent clients (grpcio's asyncio client,
  one channel per client, each client appending to its own streams);
- raw binary COPY into the same table (pre-encoded rows, one transaction per 1,000 events): the
  database's ceiling for appends;
- one-row INSERT + COMMIT into the same table, sequentially through psycopg: what one durable
  commit per event costs (the floor a group-committing writer has to beat);
- GetEvents events/s over one 10k-event stream (default pages) vs `COPY (SELECT …) TO STDOUT
  (FORMAT BINARY)` of the same rows.

Figures are ratios measured side by side in the same run; absolute numbers depend on the machine.
Every load loop is bounded in time and count and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired
from progress import step

from eventstore import _es_codec as codec
from eventstore.db.migrations import apply_migrations
from eventstore.embedded import EmbeddedPostgres
from eventstore.v1 import eventstore_pb2 as pb

SERVICE = "/eventstore.v1.EventStoreService/"
PAYLOAD = orjson.dumps({"word": "neko", "reading": "ねこ", "meaning": "cat", "level": 5,
                        "tags": ["animal", "n5"], "example": "猫が好きです。" * 4})
METADATA = orjson.dumps({"correlation_id": str(uuid.uuid4()), "service": "vocabulary"})


def start_server(url: str, log_path: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Run `eventstore serve` as its own process; its log goes to a file (a pipe nobody reads
    would fill up and stall the server)."""
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="es-bench-log-")) / "server.log"
    env = {**os.environ, "DATABASE_URL": url, "PORT": "0", "HTTP_PORT": "0", "HOST": "127.0.0.1",
           "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", **(extra_env or {})}
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "eventstore", "serve"], env=env,
                            stderr=log, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_bytes().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "eventstore listening":
                print(f"server log: {log_path}", flush=True)
                return proc, int(entry["grpc_port"])
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start; see {log_path}")


def stop_process(proc: subprocess.Popen[bytes], seconds: float = 20) -> None:
    """SIGTERM (a graceful stop), and SIGKILL if it has not exited within `seconds`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def new_events(n: int) -> list[pb.NewEvent]:
    return [pb.NewEvent(event_id=str(uuid.uuid4()), event_type="WordAdded", data=PAYLOAD,
                        metadata=METADATA) for _ in range(n)]


def fresh_event_ids(n: int) -> list[bytes]:
    """`n` random (version 4) UUIDs as text, a quarter of `uuid.uuid4()`'s cost each."""
    raw = os.urandom(16 * n).hex()
    return [f"{raw[k:k + 8]}-{raw[k + 8:k + 12]}-4{raw[k + 13:k + 16]}-"
            f"{'89ab'[int(raw[k + 16], 16) & 3]}{raw[k + 17:k + 20]}-{raw[k + 20:k + 32]}"
            .encode() for k in range(0, 32 * n, 32)]


class AppendRequests:
    """Serialized AppendEventsRequests of `batch` events, each with a fresh id, built the way
    a load generator should be: the events' constant part is serialized once and each id
    spliced in (protobuf allows a message's fields in any order and repeated fields in
    pieces). Building them with protobuf objects, 100 events a request, cost the load
    generator more CPU than the server spends on the append, on the same two cores; the raw
    COPY baseline's rows are encoded before its clock starts."""

    _PLACEHOLDER = "00000000-0000-4000-8000-000000000000"

    def __init__(self, batch: int, stream_type: str = "Bench") -> None:
        template = pb.AppendEventsRequest(events=[pb.NewEvent(
            event_id=self._PLACEHOLDER, event_type="WordAdded", data=PAYLOAD,
            metadata=METADATA)]).SerializeToString()
        at = template.index(self._PLACEHOLDER.encode())
        self._before, self._after = template[:at], template[at + len(self._PLACEHOLDER):]
        self._batch = batch
        self._stream_type = stream_type

    def build(self, stream: str, expected_version: int) -> bytes:
        head = pb.AppendEventsRequest(stream_id=stream, stream_type=self._stream_type,
                                      expected_version=expected_version).SerializeToString()
        before, after = self._before, self._after
        return head + b"".join(
            [piece for event_id in fresh_event_ids(self._batch)
             for piece in (before, event_id, after)])


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def append_load(port: int, clients: int, batch: int, seconds: float,
                      max_requests: int, server_pid: int | None = None) -> dict[str, float]:
    """`clients` concurrent clients, each appending `batch` events per request to its own
    streams, for `seconds` (or `max_requests` requests in all)."""
    cpu_before = cpu_seconds(server_pid)
    latencies: list[float] = []
    events = 0
    stop_at = time.monotonic() + seconds
    sent = 0

    requests = AppendRequests(batch)

    async def one_client() -> None:
        nonlocal events, sent
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(SERVICE + "AppendEvents",
                                       request_serializer=bytes,
                                       response_deserializer=pb.AppendEventsResponse.FromString)
            stream = str(uuid.uuid4())
            version = 0
            while time.monotonic() < stop_at and sent < max_requests:
                sent += 1
                request = requests.build(stream, version)
                t0 = time.perf_counter()
                reply = await call(request, timeout=30)
                latencies.append(time.perf_counter() - t0)
                version = reply.next_expected_version
                events += batch
                if version >= 1000:
                    stream, version = str(uuid.uuid4()), 0

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies.sort()

    def at(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * q))]

    return {
        "events_per_s": events / elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "requests": len(latencies),
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "server_cpu_s_per_1000_events": 1000 * (cpu_seconds(server_pid) - cpu_before) / events
        if server_pid and events else 0.0,
    }


def start_noop_server() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("noop_server.py"))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


async def noop_streaming(port: int, messages: int) -> float:
    """Messages/s of the no-op server streaming `messages` ready-made notifications."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(SERVICE + "SubscribeToAll",
                                    request_serializer=pb.SubscribeAllRequest.SerializeToString,
                                    response_deserializer=pb.EventNotification.FromString)
        t0 = time.perf_counter()
        count = 0
        async for _ in call(pb.SubscribeAllRequest(max_batch_size=messages)):
            count += 1
        return count / (time.perf_counter() - t0)


def raw_copy(url: str, total: int, per_tx: int) -> float:
    """Events/s of pre-encoded binary COPY into `events`, one transaction per `per_tx`."""
    chunks = []
    stream = str(uuid.uuid4())
    with psycopg.connect(url) as conn:
        head = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]
        for i in range(total // per_tx):
            request = codec.AppendRequest.parse(
                pb.AppendEventsRequest(stream_id=stream, stream_type="RawCopy",
                                       events=new_events(per_tx)).SerializeToString(),
                100_000, 1 << 24)
            chunks.append(codec.encode_copy([request], [1 + i * per_tx],
                                            head + 1 + i * per_tx, 0))
        conn.commit()
        t0 = time.perf_counter()
        for payload in chunks:
            with conn.cursor() as cur, cur.copy(
                "COPY events (event_id, stream_id, stream_type, version, event_type, data,"
                " metadata, created_at, position) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.write(payload)
            conn.commit()
        return total / (time.perf_counter() - t0)


def settle(url: str) -> None:
    """VACUUM (ANALYZE) the events table after loading it, so that the first read of new rows
    (which sets their hint bits) is not paid by whichever side of a comparison reads first;
    catch-up and replay in production read settled rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) events")


def insert_commit(url: str, seconds: float, max_rows: int) -> float:
    """Events/s of sequential single-row INSERT + COMMIT into `events` (one durable commit per
    event), for `seconds` or `max_rows` rows."""
    stream = str(uuid.uuid4())
    with psycopg.connect(url) as conn:
        head = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]
        conn.commit()
        rows = 0
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        while rows < max_rows and time.perf_counter() < stop_at:
            rows += 1
            conn.execute(
                "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data,"
                " metadata, created_at, position) VALUES (%s, %s, 'InsertCommit', %s, 'WordAdded',"
                " %s::jsonb, %s::jsonb, now(), %s)",
                (uuid.uuid4(), stream, rows, PAYLOAD.decode(), METADATA.decode(), head + rows),
                prepare=True,
            )
            conn.commit()
        return rows / (time.perf_counter() - t0)


def reading_channel(port: int) -> grpc.aio.Channel:
    """A channel for reads: replies up to 64 MiB (grpcio's default limit is 4 MiB). Await its
    `channel_ready()` before starting a clock: connecting is not reading (the COPY baselines
    connect before theirs, too)."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)])


async def get_events_load(port: int, stream: str, rounds: int) -> float:
    async with reading_channel(port) as channel:
        call = channel.unary_unary(SERVICE + "GetEvents",
                                   request_serializer=pb.GetEventsRequest.SerializeToString,
                                   response_deserializer=pb.GetEventsResponse.FromString)
        await channel.channel_ready()
        count = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            from_version = 0
            while True:
                reply = await call(pb.GetEventsRequest(stream_id=stream, stream_type="Read",
                                                       from_version=from_version), timeout=30)
                count += len(reply.events)
                if not reply.has_more:
                    break
                from_version = reply.next_from_version
        return count / (time.perf_counter() - t0)


def copy_out(url: str, stream: str, rounds: int) -> float:
    with psycopg.connect(url) as conn:
        count = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            with conn.cursor() as cur, cur.copy(
                "COPY (SELECT event_id, stream_id, stream_type, version, event_type, data,"
                " metadata, created_at, position FROM events WHERE stream_id = %s"
                " AND stream_type = 'Read' ORDER BY version) TO STDOUT (FORMAT BINARY)",
                (stream,),
            ) as copy:
                for _row in copy:
                    count += 1
        return (count - rounds) / (time.perf_counter() - t0)  # minus one trailer chunk a round


async def load_with_snapshot(port: int, stream: str, rounds: int) -> tuple[float, float]:
    """Seconds per rebuild of the stream: GetEvents with include_snapshot (the snapshot and
    the events since), and a full replay of every event."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        save = channel.unary_unary(SERVICE + "SaveSnapshot",
                                   request_serializer=pb.SaveSnapshotRequest.SerializeToString,
                                   response_deserializer=pb.SaveSnapshotResponse.FromString)
        get = channel.unary_unary(SERVICE + "GetEvents",
                                  request_serializer=pb.GetEventsRequest.SerializeToString,
                                  response_deserializer=pb.GetEventsResponse.FromString)
        await save(pb.SaveSnapshotRequest(stream_id=stream, stream_type="Read", version=9_900,
                                          data=PAYLOAD), timeout=30)
        t0 = time.perf_counter()
        for _ in range(rounds):
            reply = await get(pb.GetEventsRequest(stream_id=stream, stream_type="Read",
                                                  include_snapshot=True), timeout=30)
            assert reply.snapshot.version == 9_900 and len(reply.events) == 100
        with_snapshot = (time.perf_counter() - t0) / rounds
        t0 = time.perf_counter()
        for _ in range(rounds):
            from_version = 0
            while True:
                reply = await get(pb.GetEventsRequest(stream_id=stream, stream_type="Read",
                                                      from_version=from_version), timeout=30)
                if not reply.has_more:
                    break
                from_version = reply.next_from_version
        replay = (time.perf_counter() - t0) / rounds
    return with_snapshot, replay


async def seed_stream(port: int, stream: str, n: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(SERVICE + "AppendEvents",
                                   request_serializer=pb.AppendEventsRequest.SerializeToString,
                                   response_deserializer=pb.AppendEventsResponse.FromString)
        for _ in range(n // 1000):
            await call(pb.AppendEventsRequest(stream_id=stream, stream_type="Read",
                                              events=new_events(1000)), timeout=60)


async def measure(url: str, port: int, seconds: float, quick: bool,
                  server_pid: int | None = None) -> dict[str, object]:
    appends = {}
    for clients in (1, 16, 64):
        for batch in (1, 10, 100):
            with step(f"append batch={batch} clients={clients}"):
                r = await append_load(port, clients, batch, seconds, 200_000, server_pid)
            appends[f"batch{batch}_clients{clients}"] = r
            print(f"append batch={batch:<3} clients={clients:<2} "
                  f"{r['events_per_s']:>9.0f} ev/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p95 {r['p95_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                  f"cpu {r['server_cpu_s_per_1000_events']:.3f} s/1k ev", flush=True)
    # The gated ratios come from alternations of ours and the baseline (benches/paired.py).
    pairs, pair_seconds = (3, 1.5) if quick else (5, 3.0)

    async def rate(target: int, clients: int, batch: int, key: str = "events_per_s") -> float:
        return (await append_load(target, clients, batch, pair_seconds, 200_000))[key]

    noop, noop_port = start_noop_server()
    try:
        with step("no-op purerpc unary, 64 clients"):
            noop_unary = await append_load(noop_port, 64, 1, seconds, 200_000)
        with step("no-op purerpc unary, 1 client"):
            # The transport's latency floor for one sequential client.
            noop_single = await append_load(noop_port, 1, 1, seconds, 200_000, noop.pid)
        with step("no-op purerpc streaming"):
            noop_stream = await noop_streaming(noop_port, 20_000 if quick else 100_000)
        batch1_vs_noop = await paired(
            "batch-1 appends, 64 clients / no-op unary", lambda: rate(port, 64, 1),
            lambda: rate(noop_port, 64, 1, "requests_per_s"), pairs)
    finally:
        noop.kill()
        noop.wait()
    print(f"no-op purerpc unary, 64 clients {noop_unary['requests_per_s']:>9.0f} calls/s",
          flush=True)
    print(f"no-op purerpc unary, 1 client   {noop_single['requests_per_s']:>9.0f} calls/s  "
          f"p50 {noop_single['p50_ms']:.2f} ms  p99 {noop_single['p99_ms']:.2f} ms", flush=True)
    print(f"no-op purerpc streaming         {noop_stream:>9.0f} msgs/s", flush=True)
    batch100_vs_copy = await paired(
        "batch-100 appends, 16 clients / raw binary COPY", lambda: rate(port, 16, 100),
        lambda: raw_copy(url, 10_000 if quick else 20_000, 1000), pairs)
    copy_in = float(batch100_vs_copy["baseline"])  # type: ignore[arg-type]
    print(f"raw binary COPY in          {copy_in:>9.0f} ev/s", flush=True)
    with step("one-row INSERT + COMMIT"):
        one_row = insert_commit(url, seconds, 100_000)
    print(f"one-row INSERT + COMMIT     {one_row:>9.0f} ev/s", flush=True)
    stream = str(uuid.uuid4())
    with step("seed a 10k-event stream"):
        await seed_stream(port, stream, 10_000)
        settle(url)
    rounds = 3 if quick else 10
    get_vs_copy = await paired(
        "GetEvents / COPY TO STDOUT, 10k-event stream",
        lambda: get_events_load(port, stream, 1), lambda: copy_out(url, stream, 1),
        2 * rounds + 1)
    get_rate = float(get_vs_copy["ours"])  # type: ignore[arg-type]
    out_rate = float(get_vs_copy["baseline"])  # type: ignore[arg-type]
    print(f"GetEvents 10k stream        {get_rate:>9.0f} ev/s", flush=True)
    print(f"COPY TO STDOUT same rows    {out_rate:>9.0f} ev/s", flush=True)
    with step("rebuild with snapshot / full replay"):
        with_snapshot, replay = await load_with_snapshot(port, stream, rounds * 3)
    print(f"rebuild 10k stream: snapshot@9900 + 100 events {1000 * with_snapshot:.2f} ms,"
          f" full replay {1000 * replay:.2f} ms", flush=True)
    return {
        "appends": appends,
        "raw_copy_in_events_per_s": copy_in,
        "insert_commit_events_per_s": one_row,
        "get_events_events_per_s": get_rate,
        "copy_out_events_per_s": out_rate,
        "noop_unary_calls_per_s": noop_unary["requests_per_s"],
        "noop_unary_clients1": noop_single,
        "noop_streaming_messages_per_s": noop_stream,
        "rebuild_with_snapshot_ms": 1000 * with_snapshot,
        "rebuild_full_replay_ms": 1000 * replay,
        "paired": {"batch100_appends_vs_copy_in": batch100_vs_copy,
                   "get_events_vs_copy_out": get_vs_copy,
                   "batch1_clients64_vs_noop_unary": batch1_vs_noop},
        "ratios": {
            "batch100_appends_vs_copy_in": batch100_vs_copy["ratio"],
            "get_events_vs_copy_out": get_vs_copy["ratio"],
            "batch1_clients64_vs_noop_unary": batch1_vs_noop["ratio"],
            # Informational (not gated): one client's append latency against the transport's
            # own floor, and group commit against one commit per event.
            "batch1_clients1_p50_vs_noop_p50": appends["batch1_clients1"]["p50_ms"]
            / noop_single["p50_ms"],
            "batch1_clients64_vs_insert_commit": appends["batch1_clients64"]["events_per_s"]
            / one_row,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 8.0
    results: dict[str, object] = {
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count()},
    }
    with tempfile.TemporaryDirectory(prefix="es-bench-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", extra_conf={"max_connections": "200"})
        url = pg.url("bench")
        with psycopg.connect(url, autocommit=True) as conn:
            apply_migrations(conn)
            results["environment"]["postgres"] = conn.execute(  # type: ignore[index]
                "SHOW server_version").fetchone()[0]
        proc, port = start_server(url)
        try:
            # One event loop for every load: grpc.aio binds its poller to the first loop.
            results.update(asyncio.run(measure(url, port, seconds, args.quick, proc.pid)))
            print(json.dumps(results["ratios"], indent=2))
        finally:
            stop_process(proc, 15)
            pg.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
