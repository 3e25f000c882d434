"""Progress lines on stderr, so a run of several minutes shows where it is.

    with step("append batch=1 clients=16"):
        ...

prints `[   12.3 s] start append batch=1 clients=16` when the block starts and
`[   15.0 s] end   append batch=1 clients=16 (2.7 s)` when it ends (`FAILED` instead of `end` if
it raised). The first figure is the time since this module was imported (the start of the run).
Results stay on stdout; only progress goes to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_STARTED = time.monotonic()


def note(message: str) -> None:
    """One progress line, stamped with the time since the run started."""
    print(f"[{time.monotonic() - _STARTED:8.1f} s] {message}", file=sys.stderr, flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Report the start and the end (with its duration) of one measurement."""
    t0 = time.monotonic()
    note(f"start {what}")
    try:
        yield
    except BaseException:
        note(f"FAILED {what} ({time.monotonic() - t0:.1f} s)")
        raise
    note(f"end   {what} ({time.monotonic() - t0:.1f} s)")
