"""Migrations, indexes and generated stubs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from eventstore.db.connection import connect
from eventstore.db.migrations import (
    Migration,
    MigrationError,
    apply_migrations,
    load_migrations,
    pending_migrations,
)
from tests.conftest import PgCluster

ROOT = Path(__file__).resolve().parent.parent


def empty_database(pg_cluster: PgCluster, name: str) -> str:
    with psycopg.connect(pg_cluster.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    return pg_cluster.url_for(name)


def test_migrations_apply_once_and_are_recorded(pg_cluster: PgCluster) -> None:
    url = empty_database(pg_cluster, "es_migrations_test")
    with psycopg.connect(url, autocommit=True) as conn:
        assert pending_migrations(conn) == load_migrations()
        applied = apply_migrations(conn)
        assert [m.version for m in applied] == [m.version for m in load_migrations()]
        assert apply_migrations(conn) == []
        assert pending_migrations(conn) == []
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"event_streams", "events", "snapshots", "schema_migrations"} <= tables
        recorded = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
        assert recorded == [(m.version, m.checksum) for m in load_migrations()]


def test_append_functions_keep_their_plans(database_url: str) -> None:
    """The writer's per-commit functions carry no per-call setting (migration 004), and the
    writer's connection plans its own statements per execution without forcing custom plans
    on them: that combination is what lets PL/pgSQL keep the functions' plans."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        settings = dict(conn.execute(
            "SELECT proname, proconfig FROM pg_proc WHERE proname IN"
            " ('eventstore_begin_append', 'eventstore_finish_append')").fetchall())
    assert settings == {"eventstore_begin_append": None, "eventstore_finish_append": None}
    writer = connect(database_url, prepare=False)
    try:
        assert writer.prepare_threshold is None
        row = writer.execute("SHOW plan_cache_mode").fetchone()
        assert row == ("auto",)
    finally:
        writer.close()


def test_a_changed_migration_is_refused(pg_cluster: PgCluster) -> None:
    url = empty_database(pg_cluster, "es_migrations_changed")
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn)
        first = load_migrations()[0]
        changed = Migration(first.version, first.name, first.sql + "\n-- edited\n")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            apply_migrations(conn, [changed])


def test_migrate_command(pg_cluster: PgCluster) -> None:
    url = empty_database(pg_cluster, "es_migrate_cli")
    env = {"DATABASE_URL": url, "PATH": "/usr/bin:/bin", "LOG_FORMAT": "text"}
    out = subprocess.run([sys.executable, "-m", "eventstore", "migrate"], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert "applied: 001_schema" in out.stdout
    again = subprocess.run([sys.executable, "-m", "eventstore", "migrate"], env=env,
                           capture_output=True, text=True, timeout=120, check=True)
    assert "already up to date" in again.stdout


def test_bad_configuration_stops_start_up_naming_the_variable() -> None:
    out = subprocess.run([sys.executable, "-m", "eventstore", "serve"],
                         env={"PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "PORT" in out.stderr


@pytest.mark.parametrize(("query", "index"), [
    ("SELECT * FROM events WHERE position > 5 ORDER BY position LIMIT 100",
     "events_position_key"),
    ("SELECT * FROM events WHERE stream_id = '00000000-0000-0000-0000-000000000001'"
     " AND stream_type = 'T' AND version >= 1 ORDER BY version LIMIT 100",
     "events_stream_id_stream_type_version_key"),
    ("SELECT * FROM events WHERE event_id = ANY('{00000000-0000-0000-0000-000000000001}')",
     "events_pkey"),
])
def test_reads_use_indexes(database_url: str, query: str, index: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SET enable_seqscan = off")  # an empty table would make a scan cheapest
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {query}"))  # type: ignore[arg-type]
    assert index in plan, plan


def test_generated_stubs_are_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
