"""The operations HTTP port (HTTP_PORT): /health/live, /health/ready, /metrics.

Served by Hypercorn on Trio; the application itself is a few routes of plain ASGI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CONTENT_TYPE_LATEST

from eventstore.health import Health
from eventstore.metrics import Metrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class OperationsApp:
    def __init__(self, health: Health, metrics: Metrics,
                 refresh: Callable[[], Awaitable[None]], authentication: str, tls: bool,
                 standby: bool = False) -> None:
        self._health = health
        self._metrics = metrics
        self._refresh = refresh
        self._authentication = authentication
        self._tls = tls
        self._standby = standby

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health/live":
            await _reply(send, 200, orjson.dumps({"status": "live"}), "application/json")
        elif path == "/health/ready":
            state = self._health.state
            body = {"status": "ready" if state.ready else "not ready", "reason": state.reason,
                    "database": state.database, "migrations_applied": state.migrations,
                    "draining": state.draining,
                    # "open" (anyone may call: local development only), "mtls", "api_keys".
                    "authentication": self._authentication, "tls": self._tls,
                    # A read replica's server: reads and subscriptions only.
                    "standby": self._standby}
            await _reply(send, 200 if state.ready else 503, orjson.dumps(body),
                         "application/json")
        elif path == "/metrics":
            await self._refresh()
            await _reply(send, 200, self._metrics.exposition(), CONTENT_TYPE_LATEST)
        else:
            await _reply(send, 404, orjson.dumps({"error": f"no such path: {path}"}),
                         "application/json")


async def _reply(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def serve_http(app: OperationsApp, host: str, port: int, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on host:port; report the bound port."""
    config = Config()
    bind_host = "0.0.0.0" if host in ("", "*") else host
    config.bind = [f"[{bind_host}]:{port}" if ":" in bind_host else f"{bind_host}:{port}"]
    config.accesslog = None
    config.errorlog = None

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, app, config)
        task_status.started(int(str(binds[0]).rsplit(":", 1)[1]))
