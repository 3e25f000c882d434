"""Low-level libpq calls that never wait while holding the GIL.

psycopg's C wrapper releases the GIL around `PQexec` but not around `PQgetResult` or
`PQgetCopyData`, and both block while the result is not in yet. In a worker thread that means
the whole server (the Trio loop included) stands still for as long as PostgreSQL takes: the
commit's WAL flush, the planning and first rows of a read. Here every wait for the socket is a
`poll()` (which releases the GIL), and libpq is only asked for what it already has.
"""

from __future__ import annotations

import select

from psycopg import pq

_READ = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def wait_readable(pgconn: pq.abc.PGconn) -> None:
    """Block (GIL released) until the connection's socket has input, then read it into
    libpq's buffer. A lost connection raises psycopg.OperationalError."""
    poller = select.poll()
    poller.register(pgconn.socket, _READ)
    poller.poll()
    pgconn.consume_input()


def get_result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """`PQgetResult` once the result is complete (None: no more results). Call after
    `send_query` (or a COPY's end) as `PQgetResult` would be."""
    while pgconn.is_busy():
        wait_readable(pgconn)
    return pgconn.get_result()


def copy_out(pgconn: pq.abc.PGconn) -> tuple[bytes, int]:
    """Everything a COPY TO STDOUT in progress sends, as one bytes object, and the last
    `PQgetCopyData` status (-1: the COPY ended; -2: it failed).

    Buffered rows are taken without releasing the GIL (one quick call each); only when libpq's
    buffer is empty does the thread wait, in `poll()`."""
    chunks = []
    get = pgconn.get_copy_data
    while True:
        size, data = get(1)
        if size > 0:
            chunks.append(data)
        elif size == 0:
            wait_readable(pgconn)
        else:
            return b"".join(chunks), size
