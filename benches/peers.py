"""Peers measured side by side with eventstore: same machine, same run, same payload.

    python benches/peers.py [--quick] [--out results.json]   # standalone, its own PostgreSQL

run.py calls `measure()` on the PostgreSQL it started (after our server has stopped, so the
peers have the machine to themselves, as we had). Both peers are optional (`pip install -e
'.[bench]'`); a peer that is not installed is skipped with a one-line message.

- eventsourcing: the library's `PostgresApplicationRecorder.insert_events`, the layer an
  eventsourcing application appends through (a transaction with `LOCK TABLE … IN EXCLUSIVE
  MODE`, `NOTIFY`, an `INSERT … SELECT FROM unnest(…)` of the batch), on the same PostgreSQL in
  its own schema. Each client is a thread with its own pooled connection, appending to its own
  aggregate; version conflicts are caught by the (originator_id, originator_version) primary key,
  as our expected version is by the (stream, version) unique key.
- UmaDB: its Rust gRPC server (`umadb --listen 127.0.0.1:PORT --db-path DIR/uma.db`, durable
  before it answers, concurrent appends grouped into one commit) and its Python client. Each
  client is a thread with its own `umadb.Client`, appending to its own tag with an append
  condition on that tag after its last position: the DCB form of an expected version.

Events carry the payload of benches/core.py (PAYLOAD as the data, METADATA as the metadata;
eventsourcing has one `state` column, so both go into it as one JSON document). Loads are
bounded in time and count, clients are threads (both clients release the GIL while they wait),
and only 127.0.0.1 / the local Unix socket is used.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import METADATA, PAYLOAD, stop_process
from progress import step

BATCHES = (1, 10, 100)
ES_CLIENTS = (1, 16, 64)
UMADB_CLIENTS = (1, 16, 64)
MAX_REQUESTS = 200_000
# Past this a thread that has not come back is abandoned (it is a daemon) and the load is marked.
JOIN_GRACE_S = 60.0
ES_SCHEMA = "peer_eventsourcing"
# Each client moves to a new aggregate / tag after this many events, as core.py's clients do.
EVENTS_PER_STREAM = 1000


class Appender(Protocol):
    """One client of a peer, used by one thread."""

    def prepare(self, batch: int) -> Any:
        """Build the request for `batch` new events (not timed as latency)."""

    def send(self, request: Any) -> None:
        """Append it and wait for the answer."""

    def close(self) -> None: ...


def thread_load(open_client: Callable[[], Appender], clients: int, batch: int,
                seconds: float, max_requests: int = MAX_REQUESTS) -> dict[str, float]:
    """`clients` threads, each appending `batch` events per request through its own client, for
    `seconds` (or `max_requests` requests in all). Clients connect before the clock starts."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    lock = threading.Lock()
    sent = 0
    t0 = stop_at = 0.0

    def go() -> None:  # run once, by the last thread to reach the barrier, before any proceeds
        nonlocal t0, stop_at
        t0 = time.perf_counter()
        stop_at = time.monotonic() + seconds

    start = threading.Barrier(clients + 1, action=go, timeout=60)

    def worker(mine: list[float]) -> None:
        nonlocal sent
        try:
            client = open_client()
        except Exception as exc:
            errors.append(exc)
            start.abort()
            return
        try:
            start.wait()
            while time.monotonic() < stop_at:
                with lock:
                    if sent >= max_requests:
                        break
                    sent += 1
                request = client.prepare(batch)
                sent_at = time.perf_counter()
                client.send(request)
                mine.append(time.perf_counter() - sent_at)
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(mine,), daemon=True) for mine in latencies]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join(JOIN_GRACE_S)
        raise RuntimeError(
            f"clients could not connect: {errors[0] if errors else 'timeout'}") from None
    deadline = time.monotonic() + seconds + JOIN_GRACE_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - t0
    stuck = sum(thread.is_alive() for thread in threads)
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed, first: {errors[0]!r}")
    merged = sorted(x for mine in latencies for x in mine)
    if not merged:
        raise RuntimeError("no request completed")

    def at(q: float) -> float:
        return 1000 * merged[min(len(merged) - 1, int(len(merged) * q))]

    result = {
        "events_per_s": len(merged) * batch / elapsed,
        "requests_per_s": len(merged) / elapsed,
        "requests": len(merged),
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
    }
    if stuck:
        result["stuck_clients"] = stuck
    return result


def state_bytes() -> bytes:
    """The same event as ours in eventsourcing's single `state` column."""
    return b'{"data":' + PAYLOAD + b',"metadata":' + METADATA + b"}"


# --- eventsourcing -----------------------------------------------------------------------------

class EventsourcingClient:
    def __init__(self, recorder: Any, stored_event: Any) -> None:
        self.recorder = recorder
        self.stored_event = stored_event
        self.state = state_bytes()
        self.aggregate = uuid.uuid4()
        self.version = 0

    def prepare(self, batch: int) -> Any:
        if self.version + batch > EVENTS_PER_STREAM:
            self.aggregate, self.version = uuid.uuid4(), 0
        events = [self.stored_event(originator_id=self.aggregate,
                                    originator_version=self.version + i + 1,
                                    topic="benches:WordAdded", state=self.state)
                  for i in range(batch)]
        self.version += batch
        return events

    def send(self, request: Any) -> None:
        self.recorder.insert_events(request)

    def close(self) -> None:
        pass


def measure_eventsourcing(url: str, seconds: float) -> dict[str, object]:
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {ES_SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {ES_SCHEMA}")
    # The embedded server listens on a Unix socket only: `host` is its directory.
    params = conninfo_to_dict(url)
    appends: dict[str, dict[str, Any]] = {}
    for clients in ES_CLIENTS:
        datastore = PostgresDatastore(
            dbname=str(params["dbname"]), host=str(params.get("host", "")),
            port=str(params.get("port", "5432")), user=str(params.get("user", "")),
            password=str(params.get("password", "")), schema=ES_SCHEMA,
            pool_size=clients, max_overflow=0, connect_timeout=30, lock_timeout=30)
        try:
            recorder = PostgresApplicationRecorder(datastore, events_table_name="stored_events")
            recorder.create_table()
            datastore.pool.open(wait=True, timeout=60)
            for batch in BATCHES:
                appends[f"batch{batch}_clients{clients}"] = one_load(
                    "eventsourcing", functools.partial(EventsourcingClient, recorder, StoredEvent),
                    clients, batch, seconds)
        finally:
            datastore.close()
    return {"version": version("eventsourcing"),
            "what": "PostgresApplicationRecorder.insert_events on the same PostgreSQL",
            "appends": appends}


# --- UmaDB -------------------------------------------------------------------------------------

def import_umadb() -> Any:
    """Import the client without letting it take over Ctrl-C: `import umadb` installs its own
    SIGINT handler process-wide."""
    previous = signal.getsignal(signal.SIGINT)
    import umadb

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous)
    return umadb


def umadb_executable() -> str:
    """The `umadb` console script of this interpreter's environment (a venv's bin is not on
    PATH when its python is run by path), else the one on PATH."""
    for directory in (sysconfig.get_path("scripts"), *os.environ.get("PATH", "").split(os.pathsep)):
        candidate = Path(directory) / "umadb"
        if directory and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError("the umadb server script is not installed")


def free_port() -> int:
    # UmaDB accepts `--listen 127.0.0.1:0` but does not report the port it got, so take a free
    # one here; another process could grab it in between, which start_umadb then reports.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_umadb(umadb: Any, workdir: Path) -> Iterator[str]:
    """A UmaDB server on loopback with its database in `workdir`; yields its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "umadb.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [umadb_executable(), "--listen", f"127.0.0.1:{port}",
             "--db-path", str(workdir / "uma.db")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-500:]
                raise RuntimeError(f"umadb exited with {proc.returncode}: {tail}")
            try:
                client = umadb.Client(url)
                try:
                    if client.check_health() == umadb.ServingStatus.SERVING:
                        break
                finally:
                    client.close()
            except umadb.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"umadb did not serve within 30 s; see {log_path}")
            time.sleep(0.1)
        yield url
    finally:
        stop_process(proc)


class UmadbClient:
    def __init__(self, umadb: Any, url: str) -> None:
        self.umadb = umadb
        self.client = umadb.Client(url)
        self.metadata = {key: str(value) for key, value in orjson.loads(METADATA).items()}
        self._new_stream()

    def _new_stream(self) -> None:
        self.tag = f"stream:{uuid.uuid4()}"
        self.query = self.umadb.Query([self.umadb.QueryItem(tags=[self.tag])])
        self.last: int | None = None
        self.count = 0

    def prepare(self, batch: int) -> Any:
        if self.count + batch > EVENTS_PER_STREAM:
            self._new_stream()
        self.count += batch
        events = [self.umadb.Event("WordAdded", PAYLOAD, tags=[self.tag], uuid=uuid.uuid4(),
                                   metadata=self.metadata)
                  for _ in range(batch)]
        return events, self.umadb.AppendCondition(self.query, after=self.last)

    def send(self, request: Any) -> None:
        events, condition = request
        self.last = self.client.append(events, condition=condition)

    def close(self) -> None:
        self.client.close()


def measure_umadb(workdir: Path, seconds: float) -> dict[str, object]:
    umadb = import_umadb()
    umadb_executable()  # skip (FileNotFoundError) before starting anything
    appends: dict[str, dict[str, Any]] = {}
    with running_umadb(umadb, workdir) as url:
        for clients in UMADB_CLIENTS:
            for batch in BATCHES:
                appends[f"batch{batch}_clients{clients}"] = one_load(
                    "UmaDB", functools.partial(UmadbClient, umadb, url), clients, batch, seconds)
    return {"version": version("umadb"),
            "what": "umadb server (loopback gRPC), Client.append with a per-stream condition",
            "appends": appends}


# --- the suite ---------------------------------------------------------------------------------

def one_load(name: str, open_client: Callable[[], Appender], clients: int, batch: int,
             seconds: float) -> dict[str, Any]:
    """thread_load with its progress and result lines; a failed load is recorded as
    {"error": …} and the peer's other loads still run."""
    label = f"{name} batch={batch} clients={clients}"
    try:
        with step(label):
            r: dict[str, Any] = thread_load(open_client, clients, batch, seconds)
    except Exception as exc:
        print(f"{name:<13} batch={batch:<3} clients={clients:<2} FAILED: {exc}"[:300], flush=True)
        return {"error": str(exc)[:300]}
    print(f"{name:<13} batch={batch:<3} clients={clients:<2} {r['events_per_s']:>9.0f} ev/s  "
          f"p50 {r['p50_ms']:.2f} ms  p95 {r['p95_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms",
          flush=True)
    return r


def missing(package: str) -> str | None:
    """Why `package` cannot be measured, or None if it is installed."""
    try:
        version(package)
    except PackageNotFoundError:
        return f"{package} is not installed (pip install -e '.[bench]')"
    return None


def measure(url: str, workdir: Path, seconds: float) -> dict[str, dict[str, object]]:
    """Every installed peer: {name: {"version", "what", "appends": {"batch{b}_clients{c}":
    {events_per_s, requests_per_s, requests, p50_ms, p95_ms, p99_ms}}}}, or {name: {"skipped":
    reason}} for a peer that is missing or failed (the suite goes on without it)."""
    peers: dict[str, dict[str, object]] = {}
    runs: dict[str, tuple[str, Callable[[], dict[str, object]]]] = {
        "eventsourcing": ("eventsourcing", lambda: measure_eventsourcing(url, seconds)),
        "umadb": ("umadb", lambda: measure_umadb(workdir / "umadb", seconds)),
    }
    for name, (package, run) in runs.items():
        reason = missing(package)
        if reason is None:
            try:
                peers[name] = run()
                continue
            except (ImportError, FileNotFoundError) as exc:
                reason = f"{name} cannot run here: {exc}"
            except Exception as exc:
                reason = f"{name} failed: {exc!r}"[:300]
        print(f"peer skipped: {reason}", flush=True)
        peers[name] = {"skipped": reason}
    return peers


def ratios(appends: dict[str, dict[str, float]],
           peers: dict[str, dict[str, object]]) -> dict[str, float]:
    """ours / theirs in events/s for every load both measured, e.g.
    `batch100_clients16_vs_umadb`. Informational: not gated by compare.py."""
    out: dict[str, float] = {}
    for name, peer in peers.items():
        theirs = peer.get("appends")
        if not isinstance(theirs, dict):
            continue
        for load, r in theirs.items():
            if load in appends and r.get("events_per_s", 0) > 0:
                out[f"{load}_vs_{name}"] = appends[load]["events_per_s"] / r["events_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from eventstore.db.migrations import apply_migrations
    from eventstore.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="es-bench-peers-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pgdata", extra_conf={"max_connections": "200"})
        try:
            url = pg.url("bench")
            with psycopg.connect(url, autocommit=True) as conn:
                apply_migrations(conn)
            results = measure(url, Path(tmp), 2.5 if args.quick else 8.0)
        finally:
            pg.stop()
    if args.out:
        args.out.write_text(json.dumps({"peers": results}, indent=2))


if __name__ == "__main__":
    main()
