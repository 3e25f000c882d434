"""Connections. psycopg's async connection needs asyncio, so under Trio we use synchronous
connections from worker threads (`trio.to_thread.run_sync`), bounded by a CapacityLimiter: one
dedicated connection for the writer, a pool for readers."""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

APPLICATION_NAME = "eventstore"


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
    settings = []
    if statement_timeout_ms:
        settings.append(f"-c statement_timeout={statement_timeout_ms}")
    conn = psycopg.connect(
        url,
        autocommit=autocommit,
        application_name=application_name,
        connect_timeout=connect_timeout,
        options=" ".join(settings),
    )
    if not prepare:
        conn.prepare_threshold = None
    return conn
