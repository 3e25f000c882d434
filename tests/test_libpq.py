"""eventstore.db.libpq against a real PostgreSQL: waits that release the GIL must still send
everything and read everything."""

from __future__ import annotations

import os
import socket
import threading

import psycopg

from eventstore.db import libpq


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


def test_copy_out_reads_every_row(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        pgconn = conn.pgconn

        def run() -> object:
            result = pgconn.exec_(b"COPY (SELECT g, repeat('y', 500) FROM generate_series(1,"
                                  b" 20000) g) TO STDOUT")
            assert result.status == psycopg.pq.ExecStatus.COPY_OUT
            data, status = libpq.copy_out(pgconn)
            final = libpq.get_result(pgconn)
            assert final is not None and final.status == psycopg.pq.ExecStatus.COMMAND_OK
            assert libpq.get_result(pgconn) is None
            return status, data.count(b"\n"), data.splitlines()[-1][:6]

        assert _in_thread(run, 20) == [(-1, 20000, b"20000\t")]
