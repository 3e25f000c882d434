"""Live delivery benchmark: commit-to-delivery latency and catch-up throughput.

    python benches/live.py [--quick] [--out results.json]

Starts its own PostgreSQL (embedded) and the server as a separate process, then measures:

- commit-to-delivery latency with 1, 16 and 64 live SubscribeToAll subscribers while one writer
  appends single events at a steady rate: delivery time minus the event's `created_at` (the
  server stamps it just before the COPY, so the figure includes the commit itself);
- catch-up throughput of SubscribeToAll (max_batch_size 1000) over 100k (quick) / 1M events,
  next to `COPY (SELECT …) TO STDOUT (FORMAT BINARY)` of the same rows read with one libpq call
  per row (the fastest Python client of PostgreSQL's own export).

Every loop is bounded in time and count, and only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import SERVICE, new_events, start_server

from eventstore import _es_codec as codec
from eventstore.db.migrations import apply_migrations
from eventstore.embedded import EmbeddedPostgres
from eventstore.v1 import eventstore_pb2 as pb


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def latency(port: int, subscribers: int, rate: float, seconds: float) -> dict[str, float]:
    delays: list[float] = []
    ready = 0
    all_ready = asyncio.Event()
    expected = int(rate * seconds)

    async def subscriber(done: asyncio.Event) -> None:
        nonlocal ready
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(
                SERVICE + "SubscribeToAll",
                request_serializer=pb.SubscribeAllRequest.SerializeToString,
                response_deserializer=pb.EventNotification.FromString)
            stream = call(pb.SubscribeAllRequest(include_existing=False,
                                                 filter=pb.Filter(stream_types=["Live"])))
            seen = 0
            async for note in stream:
                kind = note.WhichOneof("kind")
                if kind == "caught_up":
                    ready += 1
                    if ready == subscribers:
                        all_ready.set()
                elif kind == "event":
                    now = time.time()
                    created = note.event.created_at.seconds + note.event.created_at.nanos / 1e9
                    delays.append(now - created)
                    seen += 1
                    if seen >= expected:
                        break
                if done.is_set():
                    break
            stream.cancel()

    done = asyncio.Event()
    tasks = [asyncio.create_task(subscriber(done)) for _ in range(subscribers)]
    await asyncio.wait_for(all_ready.wait(), timeout=30)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        append = channel.unary_unary(SERVICE + "AppendEvents",
                                     request_serializer=pb.AppendEventsRequest.SerializeToString,
                                     response_deserializer=pb.AppendEventsResponse.FromString)
        stream = str(uuid.uuid4())
        start = time.monotonic()
        for i in range(expected):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            await append(pb.AppendEventsRequest(stream_id=stream, stream_type="Live",
                                                events=new_events(1)), timeout=30)
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    except TimeoutError:
        done.set()
    return {
        "subscribers": subscribers,
        "deliveries": len(delays),
        "expected": expected * subscribers,
        "p50_ms": 1000 * percentile(delays, 0.50),
        "p99_ms": 1000 * percentile(delays, 0.99),
    }


def seed(url: str, total: int) -> None:
    """`total` events in streams of 1,000, by binary COPY (built by the extension)."""
    with psycopg.connect(url) as conn:
        head = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]
        for i in range(total // 1000):
            request = codec.AppendRequest.parse(
                pb.AppendEventsRequest(stream_id=str(uuid.uuid4()), stream_type="Seed",
                                       events=new_events(1000)).SerializeToString(),
                100_000, 1 << 24)
            payload = codec.encode_copy([request], [1], head + 1 + i * 1000,
                                        int(time.time() * 1e6) - 946_684_800_000_000)
            with conn.cursor() as cur, cur.copy(
                "COPY events (event_id, stream_id, stream_type, version, event_type, data,"
                " metadata, created_at, position) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.write(payload)
            conn.commit()


async def catch_up(port: int, total: int) -> float:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        call = channel.unary_stream(SERVICE + "SubscribeToAll",
                                    request_serializer=pb.SubscribeAllRequest.SerializeToString,
                                    response_deserializer=pb.EventNotification.FromString)
        stream = call(pb.SubscribeAllRequest(include_existing=True, max_batch_size=1000))
        count = 0
        t0 = time.perf_counter()
        async for note in stream:
            kind = note.WhichOneof("kind")
            if kind == "batch":
                count += len(note.batch.events)
            elif kind == "event":
                count += 1
            elif kind == "caught_up":
                break
        elapsed = time.perf_counter() - t0
        stream.cancel()
        assert count >= total, (count, total)
        return count / elapsed


def copy_out_all(url: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        pgconn = conn.pgconn
        t0 = time.perf_counter()
        pgconn.exec_(b"COPY (SELECT event_id, stream_id, stream_type, version, event_type, data,"
                     b" metadata, created_at, position FROM events ORDER BY position)"
                     b" TO STDOUT (FORMAT BINARY)")
        rows = 0
        while True:
            size, _ = pgconn.get_copy_data(0)
            if size < 0:
                break
            rows += 1
        while pgconn.get_result() is not None:
            pass
        return (rows - 1) / (time.perf_counter() - t0)


async def measure(url: str, port: int, quick: bool) -> dict[str, object]:
    results: dict[str, object] = {"latency": []}
    for subscribers in (1, 16, 64):
        r = await latency(port, subscribers, rate=100.0, seconds=3.0 if quick else 10.0)
        results["latency"].append(r)  # type: ignore[attr-defined]
        print(f"live subscribers={subscribers:<3} p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms  ({r['deliveries']}/{r['expected']} delivered)",
              flush=True)
    total = 100_000 if quick else 1_000_000
    seed(url, total)
    rate = await catch_up(port, total)
    baseline = copy_out_all(url)
    print(f"SubscribeToAll catch-up      {rate:>9.0f} ev/s", flush=True)
    print(f"COPY TO STDOUT same rows     {baseline:>9.0f} ev/s", flush=True)
    results.update({"catch_up_events_per_s": rate, "catch_up_copy_out_events_per_s": baseline,
                    "ratios": {"catch_up_vs_copy_out": rate / baseline}})
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="es-bench-live-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", extra_conf={"max_connections": "200"})
        url = pg.url("bench")
        with psycopg.connect(url, autocommit=True) as conn:
            apply_migrations(conn)
        proc, port = start_server(url)
        try:
            results = asyncio.run(measure(url, port, args.quick))
            print(json.dumps(results["ratios"], indent=2))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            pg.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
