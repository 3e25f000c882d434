"""Whether other server processes share this one's database (I/O-free; `listen_for_commits`
feeds it, the writer asks it once per commit).

A commit's NOTIFY only wakes the live feeds of *other* server processes: this process's own
feed is told directly. Yet every NOTIFY wakes every listening backend, this process's own
listener included, and then this process's event loop to read it and skip it: about 0.2 ms of
CPU per commit when one server runs alone. So the writer announces its commits only while
other server processes are known to listen:

- on connecting, a listener announces itself (`HELLO`); a listener that hears a `HELLO` from
  another process answers `HERE`, so both learn of each other at once;
- every listener repeats `HERE` every `ANNOUNCE_SECONDS`; a peer not heard from (announcement
  or commit) for `EXPIRY_SECONDS` is taken to be gone;
- while this process's own listener is not connected, every commit is announced.

A commit made in the moment a new process is starting may go unannounced; that process's
feed then finds it at its next poll (`LIVE_POLL_MS`). Nothing is lost either way: a NOTIFY is
only a wake-up, and subscribers read positions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# NOTIFY payloads on the commit channel: a commit's is empty.
HELLO = "hello"
HERE = "here"
ANNOUNCE_SECONDS = 10.0
EXPIRY_SECONDS = 35.0


class Peers:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._listening = False
        self._last_heard: float | None = None

    def listening(self, connected: bool) -> None:
        """This process's listener is connected (and has announced itself), or not."""
        self._listening = connected

    def heard(self, payload: str) -> str | None:
        """A notification from another process: what to answer (`HERE` to a `HELLO`), if
        anything."""
        self._last_heard = self._clock()
        return HERE if payload == HELLO else None

    def present(self) -> bool:
        """Whether the writer should announce its commits."""
        if not self._listening:
            return True
        return (self._last_heard is not None
                and self._clock() - self._last_heard < EXPIRY_SECONDS)


def is_commit(payload: str) -> bool:
    """Whether a notification announces a commit (rather than a listener)."""
    return payload not in (HELLO, HERE)
