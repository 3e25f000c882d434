"""The benchmark suite: one command, quick or full mode, one JSON result.

    python benches/run.py --quick [--out benches/results/latest.json] [--no-peers]
    python benches/run.py --full

It starts its own PostgreSQL (embedded, durable settings) and runs the server as a separate
process, as in production, then measures in one run, side by side with PostgreSQL's own rates on
the same table (figures are compared as ratios, so a faster or slower machine does not move
them):

- appends: batch sizes 1, 10, 100 × 1, 16 and 64 clients (events/s, p50/p95/p99 latency), next
  to raw binary COPY and to one-row INSERT + COMMIT into the same table;
- reads: GetEvents over a 10k-event stream, next to COPY TO STDOUT of the same rows;
- live: commit-to-delivery latency with 1, 16, 64 subscribers; SubscribeToAll catch-up and
  ReadAll paging over 100k (quick) / 1M (full) events, next to COPY TO STDOUT of the same rows;
- peers (optional, `pip install -e '.[bench]'`; `--no-peers` skips them): the eventsourcing
  library's PostgreSQL recorder on the same PostgreSQL and a UmaDB server, with the same payload
  and loads (benches/peers.py); ours / theirs goes into the ratios, ungated.

At the end it writes the JSON result, PNG charts next to it (benches/charts.py, if matplotlib is
installed) and prints a summary table (benches/table.py). Progress lines go to stderr.

`benches/compare.py RESULT benches/baseline.json` gates on the ratios (see the README).
Every load is bounded in time and count and uses 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import charts
import core
import live
import peers
import table
from progress import step

from eventstore.db.migrations import apply_migrations
from eventstore.embedded import EmbeddedPostgres

RESULTS = Path(__file__).resolve().parent / "results"


def environment(url: str) -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with psycopg.connect(url, autocommit=True) as conn:
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                    for name in ("server_version", "shared_buffers", "synchronous_commit",
                                 "fsync", "wal_level", "max_wal_size")}
    versions = {}
    for package in ("eventstore", "purerpc", "trio", "psycopg", "grpcio", "protobuf",
                    "eventsourcing", "umadb", "matplotlib"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = "?"
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu, "cpus": os.cpu_count(), "postgres": settings, "packages": versions,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def load_seconds(quick: bool) -> float:
    """How long each append load runs."""
    return 2.5 if quick else 8.0


async def measure_all(url: str, port: int, quick: bool, server_pid: int) -> dict[str, object]:
    with step("core: appends, PostgreSQL baselines, reads"):
        results = await core.measure(url, port, load_seconds(quick), quick, server_pid)
    with step("live: delivery latency, catch-up"):
        live_results = await live.measure(url, port, quick)
    ratios = dict(results.pop("ratios"))  # type: ignore[call-overload]
    ratios.update(live_results.pop("ratios"))  # type: ignore[call-overload]
    paired = dict(results.pop("paired"))  # type: ignore[call-overload]
    paired.update(live_results.pop("paired"))  # type: ignore[call-overload]
    results.update(live_results)
    results["ratios"] = ratios
    results["paired"] = paired
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes (the CI mode)")
    mode.add_argument("--full", action="store_true", help="longer loads, 1M-event catch-up")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the eventsourcing and UmaDB measurements")
    args = parser.parse_args()
    quick = not args.full
    with tempfile.TemporaryDirectory(prefix="es-bench-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", extra_conf={"max_connections": "200",
                                                                "track_commit_timestamp": "on"})
        try:
            url = pg.url("bench")
            with psycopg.connect(url, autocommit=True) as conn:
                apply_migrations(conn)
            with step("start the eventstore server"):
                proc, port = core.start_server(url, Path(tmp) / "server.log")
            try:
                results = asyncio.run(measure_all(url, port, quick, proc.pid))
            finally:
                core.stop_process(proc)
            # The peers run once our server has stopped: each has the machine to itself.
            if not args.no_peers:
                with step("peers: eventsourcing, UmaDB"):
                    results["peers"] = peers.measure(url, Path(tmp), load_seconds(quick))
                results["ratios"].update(  # type: ignore[attr-defined]
                    peers.ratios(results["appends"], results["peers"]))  # type: ignore[arg-type]
            results["mode"] = "quick" if quick else "full"
            results["environment"] = environment(url)
        finally:
            pg.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    drawn: list[Path] = []
    try:
        with step("charts"):
            drawn = charts.write(args.out)
    except Exception as exc:  # the result is written; a chart is not worth failing the run for
        print(f"charts failed: {exc!r}", flush=True)
    baseline = json.loads(table.BASELINE.read_text())
    print("\n" + table.render(results, baseline))
    print(f"\nresults: {args.out}")
    for path in drawn:
        print(f"chart:   {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
