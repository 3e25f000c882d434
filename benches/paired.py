"""Ratios measured in alternation: ours, then its baseline, a few times over; the median of the
per-pair ratios.

The reference machine is shared and noisy. A baseline measured once, at another moment than
ours, moved the gated ratios by ±40% between runs (COPY TO STDOUT of the same rows ranged
230k-480k events/s); measured in alternation, both sides of each pair see nearly the same
machine, and the median of the pairs' ratios shrugs off a pair that did not.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Awaitable, Callable

from progress import step

Measure = Callable[[], float | Awaitable[float]]


async def _value(measure: Measure) -> float:
    value = measure()
    if inspect.isawaitable(value):
        value = await value
    return float(value)


async def paired(label: str, ours: Measure, baseline: Measure, pairs: int) -> dict[str, object]:
    """`pairs` alternations of `ours` and `baseline` (rates, higher is better): the median
    ratio, the median of each side, and every pair."""
    taken: list[tuple[float, float]] = []
    for i in range(pairs):
        with step(f"{label}, pair {i + 1} of {pairs}"):
            taken.append((await _value(ours), await _value(baseline)))
    ratio = statistics.median(o / b for o, b in taken)
    print(f"{label}: median ratio {ratio:.2f} over {pairs} pairs "
          f"({', '.join(f'{o / b:.2f}' for o, b in taken)})", flush=True)
    return {"ratio": ratio, "ours": statistics.median(o for o, _ in taken),
            "baseline": statistics.median(b for _, b in taken),
            "pairs": [list(pair) for pair in taken]}
