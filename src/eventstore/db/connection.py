"""Connections. psycopg's async connection needs asyncio, so under Trio we use synchronous
connections from worker threads (`trio.to_thread.run_sync`), bounded by a CapacityLimiter: one
dedicated connection for the writer, a pool for readers."""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

APPLICATION_NAME = "eventstore"


def connect(url: str, *, statement_timeout_ms: int = 0, autocommit: bool = False,
            connect_timeout: int = 5) -> psycopg.Connection[TupleRow]:
    """Open one connection with the service's session settings."""
    options = f"-c statement_timeout={statement_timeout_ms}" if statement_timeout_ms else ""
    return psycopg.connect(
        url,
        autocommit=autocommit,
        application_name=APPLICATION_NAME,
        connect_timeout=connect_timeout,
        options=options,
    )
