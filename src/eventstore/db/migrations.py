"""Ordered, forward-only migrations from `sql/NNN_name.sql` (shipped as `eventstore/sql/`),
applied once each and recorded in `schema_migrations` with a checksum. Applying is idempotent
and safe when several server processes start at once (they serialize on an advisory lock)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

# pg_advisory_xact_lock key for migrations ("esmg"); the append lock uses another key.
MIGRATION_LOCK_KEY = 0x65736D67
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """Raised when the recorded migrations disagree with the files (a changed or missing file)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def _sql_dir() -> Path:
    # The migrations ship inside the package (the repository's top-level sql/ links here).
    return Path(str(resources.files("eventstore") / "sql"))


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or _sql_dir()
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file name not of the form NNN_name.sql: {path.name}")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    if not found:
        raise MigrationError(f"no migrations found in {directory}")
    return found


_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER     PRIMARY KEY,
    name       TEXT        NOT NULL,
    checksum   TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""


def apply_migrations(conn: psycopg.Connection[TupleRow],
                     migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply what is not yet applied, in order, in one transaction; return what was applied."""
    migrations = migrations if migrations is not None else load_migrations()
    applied_now: list[Migration] = []
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        cur.execute(_CREATE_LEDGER)
        cur.execute("SELECT version, checksum FROM schema_migrations")
        recorded: dict[int, str] = dict(cur.fetchall())
        for migration in migrations:
            checksum = recorded.get(migration.version)
            if checksum is not None:
                if checksum != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:03d}_{migration.name} changed after it "
                        "was applied; add a new migration instead"
                    )
                continue
            cur.execute(migration.sql.encode())
            cur.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration)
    return applied_now


def pending_migrations(conn: psycopg.Connection[TupleRow],
                       migrations: list[Migration] | None = None) -> list[Migration]:
    """The migrations not yet applied (all of them on an empty database)."""
    migrations = migrations if migrations is not None else load_migrations()
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = cur.fetchone()
        if not row or not row[0]:
            return list(migrations)
        cur.execute("SELECT version FROM schema_migrations")
        done = {r[0] for r in cur.fetchall()}
    return [m for m in migrations if m.version not in done]
