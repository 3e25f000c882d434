"""eventstore.db.libpq against a real PostgreSQL: waits that release the GIL must still send
everything and read everything."""

from __future__ import annotations

import os
import socket
import threading

import psycopg
import pytest

from eventstore.db import libpq


def _in_rust(pgconn: psycopg.pq.abc.PGconn) -> tuple[bytes, int]:
    native = libpq.native_libpq(pgconn)
    assert native is not None  # no silent fall back to the Python loop here
    return libpq.copy_out_in_rust(native, pgconn)


# Both ways of reading a COPY's rows: the Rust loop on psycopg's libpq, and psycopg's calls.
READERS = [pytest.param(_in_rust, id="rust"),
           pytest.param(libpq.copy_out_in_python, id="python")]


def _with_tiny_send_buffer(conn: psycopg.Connection[object]) -> None:
    """Make the connection's socket take only a few KiB at a time (the same socket, through a
    duplicated descriptor)."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    finally:
        sock.close()


def _in_thread(work: object, seconds: float) -> list[object]:
    """Run `work` in a daemon thread; its result, or [] if it was still waiting after
    `seconds` (a hang must fail the test, not the test run)."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)  # type: ignore[operator]
    thread.start()
    thread.join(seconds)
    return out


def test_a_query_larger_than_the_socket_takes_is_sent_whole(database_url: str) -> None:
    """psycopg's connections are nonblocking: libpq keeps the part of a query the socket does
    not take at once. Before `send_query` flushed it, waiting for the result waited forever."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.pgconn.nonblocking
        _with_tiny_send_buffer(conn)
        pgconn = conn.pgconn

        def run() -> object:
            libpq.send_query(pgconn, ("SELECT length('" + "x" * 2_000_000 + "'); SELECT 7")
                             .encode())
            values = []
            while (result := libpq.get_result(pgconn)) is not None:
                values.append(result.get_value(0, 0))
            return values

        assert _in_thread(run, 20) == [[b"2000000", b"7"]]


def test_the_rust_loop_reaches_psycopgs_libpq(database_url: str) -> None:
    # Through psycopg's extension module (psycopg[binary] brings its own libpq): the server's
    # reads take the Rust loop (the tests below run both).
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert libpq.native_libpq(conn.pgconn) is not None


@pytest.mark.parametrize("copy_out", READERS)
def test_copy_out_reads_every_row(database_url: str, copy_out: object) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        pgconn = conn.pgconn

        def run() -> object:
            result = pgconn.exec_(b"COPY (SELECT g, repeat('y', 500) FROM generate_series(1,"
                                  b" 20000) g) TO STDOUT")
            assert result.status == psycopg.pq.ExecStatus.COPY_OUT
            data, status = copy_out(pgconn)  # type: ignore[operator]
            final = libpq.get_result(pgconn)
            assert final is not None and final.status == psycopg.pq.ExecStatus.COMMAND_OK
            assert libpq.get_result(pgconn) is None
            return status, data.count(b"\n"), data.splitlines()[-1][:6]

        assert _in_thread(run, 20) == [(-1, 20000, b"20000\t")]


def test_both_loops_read_the_same_binary_copy(database_url: str) -> None:
    query = (b"COPY (SELECT md5(g::text)::uuid, g, repeat(chr(945 + g % 20), g % 300),"
             b" jsonb_build_object('n', g), timestamptz '2026-11-29 10:00:00+00' + g * interval"
             b" '1 ms' FROM generate_series(1, 5000) g ORDER BY g) TO STDOUT (FORMAT BINARY)")
    with psycopg.connect(database_url, autocommit=True) as conn:
        pgconn = conn.pgconn
        outputs = []
        for copy_out in (_in_rust, libpq.copy_out_in_python):
            assert pgconn.exec_(query).status == psycopg.pq.ExecStatus.COPY_OUT
            outputs.append(copy_out(pgconn))
            final = libpq.get_result(pgconn)
            assert final is not None and final.status == psycopg.pq.ExecStatus.COMMAND_OK
            assert libpq.get_result(pgconn) is None
    rust, python = outputs
    assert rust == python and rust[1] == -1 and len(rust[0]) > 5000 * 100
    assert rust[0].startswith(b"PGCOPY\n\xff\r\n\x00") and rust[0].endswith(b"\xff\xff")


# Rows enough to fill PostgreSQL's output buffer (so the COPY has begun on the client's side),
# then a long wait for row 200.
_SLOW_COPY = (b"COPY (SELECT g, repeat('x', 1000), pg_sleep(CASE WHEN g = 200 THEN 30 ELSE 0"
              b" END) FROM generate_series(1, 300) g) TO STDOUT")


@pytest.mark.parametrize("copy_out", READERS)
def test_a_connection_lost_mid_copy_raises(database_url: str, copy_out: object) -> None:
    """The socket ends (without a word from PostgreSQL) while the loop waits for rows:
    OperationalError, not a hang or a crash."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        pgconn = conn.pgconn
        assert pgconn.exec_(_SLOW_COPY).status == (
            psycopg.pq.ExecStatus.COPY_OUT)
        # The connection's descriptor now names a socket whose other end is closed.
        ours, theirs = socket.socketpair()
        theirs.close()
        os.dup2(ours.fileno(), pgconn.socket)
        ours.close()

        def run() -> object:
            try:
                return copy_out(pgconn)  # type: ignore[operator]
            except psycopg.OperationalError as error:
                return error

        (outcome,) = _in_thread(run, 20)
        assert isinstance(outcome, psycopg.OperationalError), outcome
        assert "consuming input failed" in str(outcome)


@pytest.mark.parametrize("copy_out", READERS)
def test_a_backend_ended_mid_copy_fails_the_copy(database_url: str, copy_out: object) -> None:
    """PostgreSQL ends the backend (an administrator, a restart) while the loop waits for
    rows: promptly, the COPY ends and its result is the error (or the connection is lost)."""
    conn = psycopg.connect(database_url, autocommit=True)  # closed, not ended: it is dead
    try:
        pgconn = conn.pgconn
        assert pgconn.exec_(_SLOW_COPY).status == psycopg.pq.ExecStatus.COPY_OUT

        def run() -> object:
            try:
                _, status = copy_out(pgconn)  # type: ignore[operator]
                final = libpq.get_result(pgconn)
                return status, final and final.status, final and final.error_message
            except psycopg.OperationalError as error:
                return error

        def end() -> None:
            threading.Event().wait(0.5)  # the loop is waiting for row 200 by now
            with psycopg.connect(database_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pgconn.backend_pid,))

        threading.Thread(target=end, daemon=True).start()
        (outcome,) = _in_thread(run, 20)
        if not isinstance(outcome, psycopg.OperationalError):
            status, final, message = outcome  # type: ignore[misc]
            assert (status, final) == (-1, psycopg.pq.ExecStatus.FATAL_ERROR), outcome
            assert b"terminating connection" in message
    finally:
        conn.close()


@pytest.mark.parametrize("copy_out", READERS)
def test_reading_copy_data_without_a_copy_raises(database_url: str, copy_out: object) -> None:
    # PQgetCopyData's -2 (here: no COPY in progress) is psycopg's OperationalError either way,
    # never a status a caller could loop on.
    with psycopg.connect(database_url, autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError,
                           match="receiving copy data failed: no COPY in progress"):
            copy_out(conn.pgconn)  # type: ignore[operator]
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is still usable
