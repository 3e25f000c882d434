"""Low-level libpq calls that never wait while holding the GIL.

psycopg's C wrapper releases the GIL around `PQexec` but not around `PQgetResult` or
`PQgetCopyData`, and both block while the result is not in yet. In a worker thread that means
the whole server (the Trio loop included) stands still for as long as PostgreSQL takes: the
commit's WAL flush, the planning and first rows of a read. Here every wait for the socket is a
`poll()` (which releases the GIL), and libpq is only asked for what it already has.
"""

from __future__ import annotations

import select
import sys

import psycopg
from psycopg import pq

from eventstore._es_codec import COPY_LOST, Libpq

_READ = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def wait_readable(pgconn: pq.abc.PGconn) -> None:
    """Block (GIL released) until the connection's socket has input, then read it into
    libpq's buffer. A lost connection raises psycopg.OperationalError."""
    poller = select.poll()
    poller.register(pgconn.socket, _READ)
    poller.poll()
    pgconn.consume_input()


def send_query(pgconn: pq.abc.PGconn, query: bytes) -> None:
    """`PQsendQuery`, and then all of the query sent: psycopg's connections are nonblocking,
    so libpq keeps what the socket does not take at once, and PostgreSQL answers only once it
    has the whole query (waiting for the answer first would wait forever)."""
    pgconn.send_query(query)
    flush(pgconn)


def flush(pgconn: pq.abc.PGconn) -> None:
    """Send what libpq still holds, waiting (GIL released) for the socket to take it; input
    that arrives meanwhile is read into libpq's buffer."""
    while pgconn.flush():
        poller = select.poll()
        poller.register(pgconn.socket, _READ | select.POLLOUT)
        if any(events & _READ for _, events in poller.poll()):
            pgconn.consume_input()


# How much COPY input is handed to libpq at a time.
COPY_CHUNK = 1 << 20


def put_copy(pgconn: pq.abc.PGconn, data: bytes, chunk: int = COPY_CHUNK) -> None:
    """Send `data` as a COPY FROM STDIN's whole input and end it (call once `get_result` has
    returned the COPY_IN result). On a nonblocking connection libpq refuses data while its
    buffer is full (`PQputCopyData` answers 0): then wait for the socket, as `flush` does."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        while not pgconn.put_copy_data(view[start:start + chunk]):
            _wait_writable(pgconn)
    while not pgconn.put_copy_end():
        _wait_writable(pgconn)
    flush(pgconn)


def _wait_writable(pgconn: pq.abc.PGconn) -> None:
    poller = select.poll()
    poller.register(pgconn.socket, _READ | select.POLLOUT)
    if any(events & _READ for _, events in poller.poll()):
        pgconn.consume_input()
    pgconn.flush()


def get_result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """`PQgetResult` once the result is complete (None: no more results). Call after
    `send_query` (or a COPY's end) as `PQgetResult` would be."""
    flush(pgconn)
    while pgconn.is_busy():
        wait_readable(pgconn)
    return pgconn.get_result()


def copy_out(pgconn: pq.abc.PGconn) -> tuple[bytes, int]:
    """Everything a COPY TO STDOUT in progress sends, as one bytes object, and the last
    `PQgetCopyData` status: -1, the COPY ended (its result, which may be an error PostgreSQL
    sent, follows). A failure to read it, or a lost connection, raises
    psycopg.OperationalError, as psycopg's `get_copy_data` does.

    The Rust extension reads the rows from psycopg's own libpq with the GIL released
    (`copy_out_in_rust`); where that libpq cannot be reached, `copy_out_in_python` does."""
    native = native_libpq(pgconn)
    if native is None:
        return copy_out_in_python(pgconn)
    return copy_out_in_rust(native, pgconn)


def copy_out_in_rust(native: Libpq, pgconn: pq.abc.PGconn) -> tuple[bytes, int]:
    """`copy_out` by the Rust extension through `native` (see `native_libpq`)."""
    pointer = getattr(pgconn, "pgconn_ptr", None)
    if pointer is None:
        raise psycopg.OperationalError("the connection is closed")
    try:
        data, size = native.copy_out(pointer)
    except OSError as error:
        raise psycopg.OperationalError(f"waiting for copy data failed: {error}") from error
    if size == COPY_LOST:
        raise psycopg.OperationalError(f"consuming input failed: {_error_message(pgconn)}")
    if size == -2:
        raise psycopg.OperationalError(f"receiving copy data failed: {_error_message(pgconn)}")
    return data, size


def _error_message(pgconn: pq.abc.PGconn) -> str:
    return pgconn.error_message.decode(errors="replace").strip()


# The libpq of each psycopg PGconn class, as the Rust extension reaches it (None: it cannot).
_native: dict[type, Libpq | None] = {}


def native_libpq(pgconn: pq.abc.PGconn) -> Libpq | None:
    """The libpq `pgconn` calls, for the Rust extension: looked up (once per implementation)
    through psycopg's own extension module, whose dependencies include that libpq whatever
    else the process has loaded. None when psycopg's implementation is not an extension
    module (its pure-Python one), or the lookup fails."""
    kind = type(pgconn)
    if kind not in _native:
        module = sys.modules.get(kind.__module__)
        path = getattr(module, "__file__", None) or ""
        try:
            _native[kind] = Libpq(path) if path.endswith(".so") else None
        except OSError:
            _native[kind] = None
    return _native[kind]


def copy_out_in_python(pgconn: pq.abc.PGconn) -> tuple[bytes, int]:
    """`copy_out` with psycopg's calls: buffered rows are taken without releasing the GIL
    (one quick call each); only when libpq's buffer is empty does the thread wait, in
    `poll()`."""
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
