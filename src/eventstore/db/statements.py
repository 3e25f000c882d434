"""Multi-statement simple queries with every statement's result, from a worker thread
(`exec_all`, waiting with the GIL released: `eventstore.db.libpq`) or from the event loop
(`exec_all_in_loop`, Trio waiting on the socket). The writer sends each commit as one such
query (parameters bound client-side, a COPY's input streamed in the middle); the commit
listener sends its announcements the same way."""

from __future__ import annotations

import logging

import psycopg
import trio
from psycopg import pq
from psycopg.rows import TupleRow

from eventstore.db import libpq
from eventstore.db.errors import result_error

log = logging.getLogger(__name__)


class Results:
    """The results of one multi-statement query, as they arrive. PostgreSQL stops at the
    first failing statement; that one's error is the query's — unless a COMMIT had already
    succeeded (an error after it cannot undo it)."""

    def __init__(self) -> None:
        self.results: list[pq.abc.PGresult] = []
        self.failed: pq.abc.PGresult | None = None

    def committed(self) -> bool:
        return any(r.status == pq.ExecStatus.COMMAND_OK and r.command_status == b"COMMIT"
                   for r in self.results)

    def add(self, pgconn: pq.abc.PGconn, result: pq.abc.PGresult,
            copy: bytes | None = None) -> bytes | None:
        """Take the next result. A COPY FROM STDIN is sent `copy` as its input (then None is
        returned: there is no more to send)."""
        if result.status == pq.ExecStatus.COPY_IN:
            if copy is None:
                # A bug, not an outage: end the COPY so the connection stays usable.
                pgconn.put_copy_end(b"no COPY input was given")
            else:
                libpq.put_copy(pgconn, copy)
            return None
        if result.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            self.failed = self.failed or result
        self.results.append(result)
        return copy

    def lost(self, exc: psycopg.OperationalError) -> None:
        """The connection went away: if COMMIT's answer had already arrived, it stands."""
        if not self.committed():
            raise exc

    def outcome(self, conn: psycopg.Connection[TupleRow]) -> list[pq.abc.PGresult]:
        if self.committed():
            if self.failed is not None:
                log.warning("an error arrived after COMMIT succeeded: %s",
                            (self.failed.error_message or b"").decode(errors="replace").strip())
            return self.results
        if self.failed is not None or conn.pgconn.status == pq.ConnStatus.BAD:
            raise result_error(conn, self.failed)
        return self.results


def exec_all(conn: psycopg.Connection[TupleRow], text: str, copy: bytes | None = None,
             ) -> list[pq.abc.PGresult]:
    """Run `text` (one or more statements, parameters bound) and return every statement's
    result (PQexec keeps only the last one), waiting for them with the GIL released
    (`eventstore.db.libpq`). `copy` is the input of the query's COPY FROM STDIN, if it has
    one. Failures as `Results` says."""
    pgconn = conn.pgconn
    libpq.send_query(pgconn, text.encode(conn.info.encoding))
    results = Results()
    while True:
        try:
            result = libpq.get_result(pgconn)
        except psycopg.OperationalError as exc:
            results.lost(exc)
            break
        if result is None:
            break
        copy = results.add(pgconn, result, copy)
    return results.outcome(conn)


async def exec_all_in_loop(conn: psycopg.Connection[TupleRow], text: str,
                           copy: bytes | None = None) -> list[pq.abc.PGresult]:
    """`exec_all` from the event loop: libpq is only asked for what it already has (or
    to queue what it has room for), and Trio waits for the connection's socket."""
    pgconn = conn.pgconn
    fd = pgconn.socket

    async def flush() -> None:
        while pgconn.flush():
            await trio.lowlevel.wait_writable(fd)

    pgconn.send_query(text.encode(conn.info.encoding))
    await flush()
    results = Results()
    while True:
        try:
            while pgconn.is_busy():
                await trio.lowlevel.wait_readable(fd)
                pgconn.consume_input()
            result = pgconn.get_result()
        except psycopg.OperationalError as exc:
            results.lost(exc)
            break
        if result is None:
            break
        if result.status == pq.ExecStatus.COPY_IN and copy is not None:
            view = memoryview(copy)
            for start in range(0, len(view), libpq.COPY_CHUNK):
                while not pgconn.put_copy_data(view[start:start + libpq.COPY_CHUNK]):
                    await trio.lowlevel.wait_writable(fd)
                    pgconn.flush()
            while not pgconn.put_copy_end():
                await trio.lowlevel.wait_writable(fd)
                pgconn.flush()
            await flush()
            copy = None
            continue
        results.add(pgconn, result)
    return results.outcome(conn)
