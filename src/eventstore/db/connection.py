"""Connections. psycopg's async connection needs asyncio, so under Trio we use synchronous
connections from worker threads (`trio.to_thread.run_sync`), bounded by a CapacityLimiter: one
dedicated connection for the writer, a pool for readers."""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

APPLICATION_NAME = "eventstore"

# Every connection's session settings, whatever the database's or role's defaults are:
# - text is exchanged as UTF-8: the writer's binary COPY sends UTF-8 bytes, which PostgreSQL
#   reads in the client encoding (on a LATIN1 database, a COPY stored "café" as "cafÃ©"
#   while an INSERT stored it right), and the Rust decoder reads rows as UTF-8;
# - READ COMMITTED: the writer reads the head position in a statement after the one that takes
#   the append lock, which sees what committed meanwhile only under READ COMMITTED (under a
#   REPEATABLE READ default two servers picked the same positions).
SESSION_OPTIONS = "-c client_encoding=UTF8 -c default_transaction_isolation=read\\ committed"

# A database host that vanishes without closing its connections (a network partition, a host
# that lost power) is noticed by TCP alone: keepalive probes after 10 s idle (a commit waiting
# for its answer is idle), dropped after 3 unanswered 5 s apart; sent data unacknowledged for
# 30 s drops the connection too. Without these the writer's commit, which is never abandoned,
# could wait for the system's defaults (hours) and no append would be answered meanwhile.
# libpq ignores them on Unix-domain sockets.
TCP_KEEPALIVES: dict[str, int] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def keepalives_for(url: str) -> dict[str, int]:
    """`TCP_KEEPALIVES`, less what `url` sets itself (the operator's word wins)."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    return {key: value for key, value in TCP_KEEPALIVES.items() if key not in given}


def connect(url: str, *, statement_timeout_ms: int = 0, autocommit: bool = False,
            connect_timeout: int = 5, prepare: bool = True,
            application_name: str = APPLICATION_NAME) -> psycopg.Connection[TupleRow]:
    """Open one connection with the service's session settings.

    `prepare=False`: psycopg never turns a statement into a named prepared statement, so
    PostgreSQL plans each execution for its actual parameters. The writer's statements take
    arrays whose length varies from 1 to thousands; a cached generic plan for them (chosen
    after five executions) was measured to make batches of 1,600 events 7x slower. Unlike
    `plan_cache_mode=force_custom_plan` (which the writer used before), this leaves the plans
    that PL/pgSQL functions keep (migration 004) alone.
    """
    settings = [SESSION_OPTIONS]
    if statement_timeout_ms:
        settings.append(f"-c statement_timeout={statement_timeout_ms}")
    conn = psycopg.connect(
        url,
        autocommit=autocommit,
        application_name=application_name,
        connect_timeout=connect_timeout,
        options=" ".join(settings),
        **keepalives_for(url),  # type: ignore[arg-type]
    )
    if not prepare:
        conn.prepare_threshold = None
    return conn
