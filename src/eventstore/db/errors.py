"""The database → domain seam: every psycopg error the store can meet becomes a domain error
here, by class (SQLSTATE), and nowhere else."""

from __future__ import annotations

import logging

import psycopg
from psycopg import errors as pgerr
from psycopg import pq

from eventstore.errors import (
    AlreadyExists,
    EventStoreError,
    Internal,
    InvalidArgument,
    Unavailable,
)

log = logging.getLogger(__name__)

# SQLSTATE class 22 (data exception) means the request carried a value PostgreSQL refuses,
# for example JSON that our validation let through but jsonb does not accept.
_DATA_EXCEPTION_CLASS = "22"


def result_error(conn: psycopg.Connection[object], result: pq.abc.PGresult | None,
                 ) -> psycopg.Error:
    """The psycopg exception for a failed low-level (libpq) result; a lost connection is
    reported as OperationalError, as psycopg's own API does."""
    if result is None or conn.pgconn.status == pq.ConnStatus.BAD:
        message = conn.pgconn.error_message.decode(errors="replace").strip()
        return psycopg.OperationalError(message or "the connection is lost")
    return psycopg.errors.error_from_result(result, encoding=conn.info.encoding)


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means the connection is gone or unusable (retry on a new one)."""
    if isinstance(exc, psycopg.OperationalError):
        return not isinstance(exc, pgerr.QueryCanceled)
    return isinstance(exc, psycopg.InterfaceError)


def is_data_error(exc: BaseException) -> bool:
    """True when PostgreSQL refused a value of the request (a client error, not an outage)."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state.startswith(_DATA_EXCEPTION_CLASS)


def to_domain(exc: BaseException, *, what: str) -> EventStoreError:
    """Translate a psycopg error met while doing `what` into a domain error."""
    if is_connection_error(exc):
        return Unavailable(f"database unavailable while {what}; retry later")
    if isinstance(exc, pgerr.QueryCanceled):
        return Unavailable(f"database timed out while {what}; retry later")
    if isinstance(exc, pgerr.UniqueViolation):
        return AlreadyExists(f"already exists ({what})")
    if is_data_error(exc):
        detail = getattr(getattr(exc, "diag", None), "message_primary", None) or "bad value"
        return InvalidArgument(f"PostgreSQL refused a value while {what}: {detail}")
    log.error("database error while %s", what, exc_info=exc)
    return Internal(f"internal error while {what}")
