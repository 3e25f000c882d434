"""A real `eventstore serve` subprocess for tests that need separate server processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio


@dataclass
class ServerProcess:
    port: int
    pid: int
    stderr: list[str]
    returncode: int | None = None


async def _drain_stderr(stream: trio.abc.ReceiveStream, lines: list[str], *,
                        task_status: trio.TaskStatus[int]) -> None:
    """Collect the process's stderr lines; report the gRPC port from the JSON log line
    `eventstore listening`; keep draining so the pipe never fills."""
    buffer = b""
    started = False
    for _ in range(10_000_000):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            lines.append(line)
            if started:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("msg") == "eventstore listening":
                started = True
                task_status.started(int(entry["grpc_port"]))
    if not started:
        raise RuntimeError("eventstore serve ended before listening:\n" + "\n".join(lines[-40:]))


@asynccontextmanager
async def eventstore_process(database_url: str,
                             extra_env: dict[str, str] | None = None,
                             ) -> AsyncIterator[ServerProcess]:
    """A real `eventstore serve` subprocess; SIGTERM (then SIGKILL) on the way out."""
    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, HOST="127.0.0.1", PORT="0", HTTP_PORT="0",
               LOG_FORMAT="json", LOG_LEVEL="INFO", **(extra_env or {}))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "eventstore.cli", "serve"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stderr is not None
            with trio.fail_after(60):
                port = await nursery.start(_drain_stderr, proc.stderr, lines)
            info = ServerProcess(port, proc.pid, lines)
            try:
                yield info
            finally:
                with trio.CancelScope(shield=True):
                    await _stop(proc)
                    info.returncode = proc.returncode
    finally:
        with trio.CancelScope(shield=True):
            await _stop(proc)
            if proc.stderr is not None:
                await proc.stderr.aclose()


async def _stop(proc: trio.Process) -> None:
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(20):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
