"""Backup and point-in-time recovery (README, "Backup and recovery"): base backups on a
schedule and by command, the embedded PostgreSQL's WAL archive, recovery to a moment."""

from __future__ import annotations

import os
import sys
import tarfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg
import pytest
import trio

from eventstore.backup import (
    BackupError,
    archive_command,
    base_for,
    base_name,
    base_time,
    bases,
    disable_archiving,
    expired,
    is_due,
    newest_segment,
    reached_the_end,
    restore,
    start_segment,
    take_base_backup,
)
from eventstore.client import EventStoreClient, NewEvent
from eventstore.embedded import EmbeddedPostgres
from eventstore.server import ServerInfo, serve
from tests.conftest import make_settings

T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def test_base_backups_are_named_by_when_they_started() -> None:
    assert base_name(T0) == "20261129T120000Z"
    assert base_time(base_name(T0 + timedelta(seconds=7))) == T0 + timedelta(seconds=7)
    for other in (".partial-20261129T120000Z", "20261129T120000", "latest", ""):
        assert base_time(other) is None


def test_which_backups_are_due_expired_or_chosen() -> None:
    day = timedelta(days=1)
    assert is_due(None, T0, day) and is_due(T0 - day, T0, day)
    assert not is_due(T0 - day + timedelta(seconds=1), T0, day)
    taken = [T0 - day * i for i in range(5)]
    assert expired(taken, 3) == [T0 - day * 4, T0 - day * 3]
    assert expired(taken, 9) == []
    # A recovery to a moment starts from the newest base backup that ended before it (by
    # their ends: one that ended later cannot stop before its end).
    assert base_for(taken, None) == T0
    assert base_for(taken, T0 - day - timedelta(seconds=1)) == T0 - day * 2
    assert base_for(taken, T0 - day) == T0 - day * 2
    with pytest.raises(BackupError, match="no base backup ended before"):
        base_for(taken, T0 - day * 4)
    with pytest.raises(BackupError, match="no base backup to restore from"):
        base_for([], None)


def test_the_archive_command_copies_safely_and_refuses_unsafe_paths() -> None:
    command = archive_command(Path("/var/backups/es/wal"))
    assert command == (
        "if test -f '/var/backups/es/wal/%f'; then cmp -s '%p' '/var/backups/es/wal/%f'; "
        "else cp '%p' '/var/backups/es/wal/%f.tmp' && sync '/var/backups/es/wal/%f.tmp' "
        "&& mv '/var/backups/es/wal/%f.tmp' '/var/backups/es/wal/%f' "
        "&& sync '/var/backups/es/wal'; fi")
    for bad in ("/it's/wal", "/100%/wal", "relative/wal", "/a\\b/wal"):
        with pytest.raises(BackupError, match="BACKUP_DIR"):
            archive_command(Path(bad))


def test_the_start_segment_is_read_from_the_backup_label() -> None:
    label = ("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
             "CHECKPOINT LOCATION: 0/2000080\n")
    assert start_segment(label) == "000000010000000000000002"
    with pytest.raises(BackupError):
        start_segment("CHECKPOINT LOCATION: 0/2000080\n")


def test_a_recovery_must_read_the_archive_to_its_newest_segment() -> None:
    names = ["000000010000000000000003", "000000010000000000000002.00000028.backup",
             "00000002.history", "000000010000000000000004", "000000010000000000000004.tmp"]
    assert newest_segment(names) == "000000010000000000000004"
    assert newest_segment(["00000002.history"]) is None
    assert reached_the_end("000000010000000000000004", "000000010000000000000004")
    # A promoted recovery names its segments on the next timeline: numbers are compared.
    assert reached_the_end("000000020000000000000004", "000000010000000000000004")
    assert not reached_the_end("000000020000000000000003", "000000010000000000000004")
    assert reached_the_end("000000010000000000000003", None)


def _rows(pgdata: Path) -> list[tuple[str, int]]:
    """(stream id, version) of every event in a stopped cluster, read by starting it."""
    cluster = EmbeddedPostgres(pgdata)
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            return [(str(r[0]), int(r[1])) for r in conn.execute(
                "SELECT stream_id, version FROM events ORDER BY position")]
    finally:
        cluster.close()


async def _cli(*args: str, env: dict[str, str]) -> str:
    with trio.fail_after(120):
        done = await trio.run_process([sys.executable, "-m", "eventstore", *args],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      env={**os.environ, **env})
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return bytes(done.stdout).decode()


@pytest.mark.slow
async def test_the_embedded_store_is_backed_up_and_recovered_to_a_moment(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """With BACKUP_DIR set, the server archives the embedded PostgreSQL's WAL and takes a base
    backup at once; `eventstore restore` recovers the store to a moment between two appends
    (the first there, the second not) or to the archive's end (both there, archived at the
    graceful stop); `eventstore backup` takes another base backup by command."""
    data_dir, backup_dir = tmp_path / "data", tmp_path / "backups"
    settings = make_settings(None, eventstore_data_dir=str(data_dir),
                             backup_dir=str(backup_dir), shutdown_grace_seconds=2)
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[ServerInfo]) -> None:
        await serve(settings, shutdown=shutdown, task_status=task_status)
        stopped.set()

    info: ServerInfo = await nursery.start(run)
    with trio.fail_after(60):
        while True:  # the first base backup is taken at start (no event tells it)
            if await trio.to_thread.run_sync(bases, backup_dir):
                break
            await trio.sleep(0.1)
    before, after = str(uuid.uuid4()), str(uuid.uuid4())
    async with EventStoreClient.connect("127.0.0.1", info.port) as client:
        await client.append_events(before, "Deck", [NewEvent("Added", {"n": 1})] * 2)
        await trio.sleep(0.3)
        moment = datetime.now(UTC)
        await trio.sleep(0.3)
        await client.append_events(after, "Deck", [NewEvent("Added", {"n": 2})])
    shutdown.set()
    with trio.fail_after(60):
        await stopped.wait()
    await trio.to_thread.run_sync(EmbeddedPostgres(data_dir / "pgdata").close)
    ((base_backup),) = await trio.to_thread.run_sync(bases, backup_dir)
    base = base_backup.path
    with tarfile.open(base / "base.tar.gz") as tar:
        assert "backup_label" in tar.getnames()
    assert base_backup.started <= base_backup.ended < moment

    # To the moment: the first append is there, the second is not.
    name, _ = await trio.to_thread.run_sync(restore, backup_dir, tmp_path / "r1", moment)
    assert name == base.name
    conf = (tmp_path / "r1" / "pgdata" / "postgresql.auto.conf").read_text()
    assert "restore_command" not in conf and "recovery_target" not in conf
    assert not (tmp_path / "r1" / "pgdata" / "recovery.signal").exists()
    assert await trio.to_thread.run_sync(_rows, tmp_path / "r1" / "pgdata") == [
        (before, 1), (before, 2)]

    # To the archive's end, by the command: both, the last one archived at the stop.
    out = await _cli("restore", "--dir", str(backup_dir), "--to", str(tmp_path / "r2"),
                     env={"LOG_FORMAT": "text"})
    assert f"recovered from base backup {base.name} up to the archive's end" in out
    # Left stopped (the base backup carries the original server's process list).
    assert not (tmp_path / "r2" / "pgdata" / "postmaster.pid").exists()
    assert await trio.to_thread.run_sync(_rows, tmp_path / "r2" / "pgdata") == [
        (before, 1), (before, 2), (after, 1)]

    # With no archived commit after the moment, PostgreSQL cannot tell the archive reaches
    # it: refused, saying so, and nothing is left behind.
    with pytest.raises(BackupError, match="found no archived commit after"):
        await trio.to_thread.run_sync(restore, backup_dir, tmp_path / "r3",
                                      datetime.now(UTC) + timedelta(hours=1))
    assert not (tmp_path / "r3" / "pgdata").exists()

    # A base backup by command, of the (stopped) embedded store; the oldest is let go, with
    # the archived WAL (and backup history files) only it needed.
    out = await _cli("backup", "--dir", str(backup_dir), "--keep", "1",
                     env={"EVENTSTORE_DATA_DIR": str(data_dir), "LOG_FORMAT": "text"})
    newest = Path(out.strip())
    (kept,) = await trio.to_thread.run_sync(bases, backup_dir)
    assert kept.path == newest and newest != base and not base.exists()
    left = os.listdir(backup_dir / "wal")
    assert left and all(name[8:24] >= kept.start_segment[8:] for name in left), left

    # Another cluster's backups do not go in the same directory.
    ours = (backup_dir / "cluster").read_text()
    (backup_dir / "cluster").write_text("7000000000000000001\n")
    cluster = await trio.to_thread.run_sync(EmbeddedPostgres, data_dir / "pgdata")
    try:
        with pytest.raises(BackupError, match="another database cluster"):
            await trio.to_thread.run_sync(take_base_backup, cluster.url(), backup_dir)
        # Served again without BACKUP_DIR, the store stops archiving (a restart).
        assert await trio.to_thread.run_sync(disable_archiving, cluster.url())
        await trio.to_thread.run_sync(cluster.stop)
        await trio.to_thread.run_sync(cluster.start)
        with psycopg.connect(cluster.url()) as conn:
            assert conn.execute("SHOW archive_mode").fetchone() == ("off",)
        assert not await trio.to_thread.run_sync(disable_archiving, cluster.url())
    finally:
        await trio.to_thread.run_sync(cluster.close)
    (backup_dir / "cluster").write_text(ours)

    # Served with BACKUP_DIR again, archiving restarts, and a base backup is taken at once
    # (the newest is young, but the archive has a hole since it): recoverable again.
    shutdown, stopped = trio.Event(), trio.Event()
    info = await nursery.start(run)
    with trio.fail_after(60):
        while True:  # no event tells it
            if len(await trio.to_thread.run_sync(bases, backup_dir)) == 2:
                break
            await trio.sleep(0.1)
    shutdown.set()
    with trio.fail_after(60):
        await stopped.wait()
    await trio.to_thread.run_sync(EmbeddedPostgres(data_dir / "pgdata").close)
    assert info.port


async def test_a_restore_refuses_a_used_directory_and_a_moment_before_every_backup(
        tmp_path: Path) -> None:
    (tmp_path / "to" / "pgdata").mkdir(parents=True)
    (tmp_path / "to" / "pgdata" / "PG_VERSION").write_text("18\n")
    with pytest.raises(BackupError, match="not empty"):
        restore(tmp_path / "backups", tmp_path / "to", None)
    base = tmp_path / "backups" / "base" / base_name(T0)
    base.mkdir(parents=True)
    for name in ("base.tar.gz", "pg_wal.tar.gz", "backup_manifest"):
        (base / name).write_bytes(b"")
    (base / "eventstore.json").write_bytes(orjson.dumps({
        "started": T0.isoformat(), "ended": (T0 + timedelta(minutes=1)).isoformat(),
        "start_segment": "000000010000000000000002"}))
    with pytest.raises(BackupError, match="no base backup ended before"):
        restore(tmp_path / "backups", tmp_path / "new", T0 - timedelta(hours=1))
    assert not (tmp_path / "new").exists()
