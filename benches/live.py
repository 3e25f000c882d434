"""Live delivery benchmark: commit-to-delivery latency and catch-up throughput.

    python benches/live.py [--quick] [--out results.json]

Starts its own PostgreSQL (embedded) and the server as a separate process, then measures:

- commit-to-delivery latency with 1, 16 and 64 live SubscribeToAll subscribers (in worker
  processes of 16 streams each) while one writer appends single events at a steady rate:
  receive time minus the commit time PostgreSQL recorded for the event's transaction
  (track_commit_timestamp); the figures from `created_at` (stamped just before the COPY, so
  including the write itself) are reported beside them;
- catch-up throughput of SubscribeToAll (max_batch_size 1000) over 100k (quick) / 1M events,
  and of paging through the same store with ReadAll (pages of 1,000, the default), each
  next to `COPY (SELECT …) TO STDOUT (FORMAT BINARY)` of the same rows read with one libpq call
  per row (the fastest Python client of PostgreSQL's own export).

Every loop is bounded in time and count, and only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import SERVICE, new_events, reading_channel, settle, start_server, stop_process
from paired import paired
from progress import step

from eventstore import _es_codec as codec
from eventstore.db.migrations import apply_migrations
from eventstore.embedded import EmbeddedPostgres
from eventstore.v1 import eventstore_pb2 as pb


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# Subscribers run in worker processes of at most this many streams each, so that one client
# event loop decoding 64 streams in turn is not what the figure measures.
SUBSCRIBERS_PER_PROCESS = 16


async def _subscribe(port: int, count: int, expected: int, deadline: float,
                     ready: Any) -> list[tuple[int, float]]:
    """`count` SubscribeToAll streams; (position, wall-clock receive time) of each delivery."""
    received: list[tuple[int, float]] = []
    caught_up = 0

    async def one(channel: grpc.aio.Channel) -> None:
        nonlocal caught_up
        call = channel.unary_stream(
            SERVICE + "SubscribeToAll",
            request_serializer=pb.SubscribeAllRequest.SerializeToString,
            response_deserializer=pb.EventNotification.FromString)
        stream = call(pb.SubscribeAllRequest(include_existing=False,
                                             filter=pb.Filter(stream_types=["Live"])))
        seen = 0
        try:
            async for note in stream:
                kind = note.WhichOneof("kind")
                if kind == "event":
                    received.append((note.event.position, time.time()))
                    seen += 1
                    if seen >= expected:
                        break
                elif kind == "caught_up":
                    caught_up += 1
                    if caught_up == count:
                        ready.set()
                if time.monotonic() > deadline:
                    break
        finally:
            stream.cancel()

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(count)]
    try:
        tasks = [asyncio.create_task(one(channel)) for channel in channels]
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        for task in tasks:
            task.cancel()
    finally:
        for channel in channels:
            await channel.close()
    return received


def _subscriber_process(port: int, count: int, expected: int, seconds: float,
                        ready: Any, results: Any) -> None:
    deadline = time.monotonic() + seconds
    results.put(asyncio.run(_subscribe(port, count, expected, deadline, ready)))


def commit_times(url: str, stream: str) -> dict[int, tuple[float, float]]:
    """position → (commit time, created_at) of the stream's events. The commit time comes from
    PostgreSQL (track_commit_timestamp); where that is off, created_at stands in for it."""
    with psycopg.connect(url, autocommit=True) as conn:
        tracked = conn.execute("SHOW track_commit_timestamp").fetchone()[0] == "on"
        commit = ("extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8" if tracked
                  else "extract(epoch FROM created_at)::float8")
        rows = conn.execute(
            f"SELECT position, {commit}, extract(epoch FROM created_at)::float8"
            " FROM events WHERE stream_id = %s", (stream,)).fetchall()
    return {int(p): (float(c), float(w)) for p, c, w in rows}


async def latency(url: str, port: int, subscribers: int, rate: float,
                  seconds: float) -> dict[str, float]:
    """Commit-to-delivery latency of `subscribers` live subscribers while one client appends
    single events at `rate` per second for `seconds`."""
    expected = int(rate * seconds)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    groups = [min(SUBSCRIBERS_PER_PROCESS, subscribers - i)
              for i in range(0, subscribers, SUBSCRIBERS_PER_PROCESS)]
    readies = [context.Event() for _ in groups]
    workers = [context.Process(target=_subscriber_process,
                               args=(port, n, expected, seconds + 60, ready, results),
                               daemon=True)
               for n, ready in zip(groups, readies, strict=True)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 60
        for ready in readies:
            while not ready.is_set():
                if time.monotonic() > deadline:
                    raise TimeoutError("the live subscribers did not start within 60 s")
                await asyncio.sleep(0.05)
        stream = str(uuid.uuid4())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            append = channel.unary_unary(
                SERVICE + "AppendEvents",
                request_serializer=pb.AppendEventsRequest.SerializeToString,
                response_deserializer=pb.AppendEventsResponse.FromString)
            start = time.monotonic()
            for i in range(expected):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                await append(pb.AppendEventsRequest(stream_id=stream, stream_type="Live",
                                                    events=new_events(1)), timeout=30)
        received: list[tuple[int, float]] = []
        for _ in workers:
            received.extend(await asyncio.to_thread(results.get, True, 90))
    finally:
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.kill()
    stamps = commit_times(url, stream)
    from_commit = [at - stamps[p][0] for p, at in received if p in stamps]
    from_write = [at - stamps[p][1] for p, at in received if p in stamps]
    return {
        "subscribers": subscribers,
        "deliveries": len(from_commit),
        "expected": expected * subscribers,
        "p50_ms": 1000 * percentile(from_commit, 0.50),
        "p95_ms": 1000 * percentile(from_commit, 0.95),
        "p99_ms": 1000 * percentile(from_commit, 0.99),
        "from_write_p50_ms": 1000 * percentile(from_write, 0.50),
        "from_write_p99_ms": 1000 * percentile(from_write, 0.99),
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
    async with reading_channel(port) as channel:
        call = channel.unary_stream(SERVICE + "SubscribeToAll",
                                    request_serializer=pb.SubscribeAllRequest.SerializeToString,
                                    response_deserializer=pb.EventNotification.FromString)
        await channel.channel_ready()
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


async def read_all(port: int, total: int, page: int = 1_000) -> float:
    """Events/s of one client paging through the whole store (`total` events: the head
    position, as positions are dense) with ReadAll, one page after the other (the way a
    projection rebuilds from the start)."""
    async with reading_channel(port) as channel:
        call = channel.unary_unary(SERVICE + "ReadAll",
                                   request_serializer=pb.ReadAllRequest.SerializeToString,
                                   response_deserializer=pb.ReadAllResponse.FromString)
        await channel.channel_ready()
        count = position = 0
        t0 = time.perf_counter()
        # Bounded: each page but the last holds events, and there are `total` of them.
        for _ in range(total // page + 2):
            reply = await call(pb.ReadAllRequest(from_position=position, max_count=page),
                               timeout=60)
            count += len(reply.events)
            if not reply.has_more:
                break
            position = reply.next_from_position
        elapsed = time.perf_counter() - t0
        assert count == total and not reply.has_more, (count, total)
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
        with step(f"live delivery, {subscribers} subscribers"):
            r = await latency(url, port, subscribers, rate=100.0,
                              seconds=3.0 if quick else 10.0)
        results["latency"].append(r)  # type: ignore[attr-defined]
        print(f"live subscribers={subscribers:<3} p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms  ({r['deliveries']}/{r['expected']} delivered)",
              flush=True)
    total = 100_000 if quick else 1_000_000
    with step(f"seed {total:,} events by COPY"):
        seed(url, total)
        settle(url)
    # The rows went in behind the server's back (no NOTIFY): let its live feed notice them at
    # its next poll (LIVE_POLL_MS, 1 s) while nobody subscribes, so the catch-up below is
    # measured alone rather than racing the feed's read of the same backlog.
    await asyncio.sleep(1.5)
    pair = await paired("SubscribeToAll catch-up / COPY TO STDOUT",
                        lambda: catch_up(port, total), lambda: copy_out_all(url), 3)
    rate, baseline = float(pair["ours"]), float(pair["baseline"])  # type: ignore[arg-type]
    print(f"SubscribeToAll catch-up      {rate:>9.0f} ev/s", flush=True)
    print(f"COPY TO STDOUT same rows     {baseline:>9.0f} ev/s", flush=True)
    with psycopg.connect(url) as conn:  # the whole store: the appends above are in it too
        head = conn.execute("SELECT max(position) FROM events").fetchone()[0]
    read_pair = await paired("ReadAll / COPY TO STDOUT", lambda: read_all(port, head),
                             lambda: copy_out_all(url), 3)
    read_rate = float(read_pair["ours"])  # type: ignore[arg-type]
    read_baseline = float(read_pair["baseline"])  # type: ignore[arg-type]
    print(f"ReadAll, pages of 1,000      {read_rate:>9.0f} ev/s", flush=True)
    results.update({"catch_up_events_per_s": rate, "catch_up_copy_out_events_per_s": baseline,
                    "read_all_events_per_s": read_rate,
                    "read_all_copy_out_events_per_s": read_baseline,
                    "paired": {"catch_up_vs_copy_out": pair, "read_all_vs_copy_out": read_pair},
                    "ratios": {"catch_up_vs_copy_out": pair["ratio"],
                               "read_all_vs_copy_out": read_pair["ratio"]}})
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="es-bench-live-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", extra_conf={"max_connections": "200",
                                                                "track_commit_timestamp": "on"})
        url = pg.url("bench")
        with psycopg.connect(url, autocommit=True) as conn:
            apply_migrations(conn)
        proc, port = start_server(url)
        try:
            results = asyncio.run(measure(url, port, args.quick))
            print(json.dumps(results["ratios"], indent=2))
        finally:
            stop_process(proc)
            pg.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
