"""PNG charts of a benchmark result, written next to it.

    python benches/charts.py RESULT.json

- RESULT-throughput.png: append events/s against concurrent clients, one panel per batch size:
  ours and the peers measured in the same run, with PostgreSQL's raw binary COPY (1,000 rows a
  transaction) and one-row INSERT + COMMIT on the same table as horizontal lines;
- RESULT-latency.png: p50/p95/p99 append latency per batch size and clients (ours and the
  peers), and commit-to-delivery percentiles of live subscriptions for 1/16/64 subscribers.

run.py calls `write()` after writing the JSON. matplotlib is optional (`pip install -e
'.[bench]'`): without it nothing is drawn and one line says so. Charts are results: they stay in
benches/results/, which git ignores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# (key in results, legend, colour, marker); ours first.
SERIES = (
    ("ours", "eventstore (ours)", "#1f77b4", "o"),
    ("eventsourcing", "eventsourcing recorder", "#ff7f0e", "s"),
    ("umadb", "UmaDB", "#2ca02c", "^"),
)
BATCHES = (1, 10, 100)


def _series(results: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(legend, colour, marker, appends) of ours and of every peer that was measured."""
    out = []
    for key, legend, colour, marker in SERIES:
        if key == "ours":
            appends = results.get("appends", {})
        else:
            appends = results.get("peers", {}).get(key, {}).get("appends", {})
            version = results.get("peers", {}).get(key, {}).get("version")
            legend = f"{legend} {version}" if version else legend
        if appends:
            out.append((legend, colour, marker, appends))
    return out


def _clients(appends: dict[str, Any], batch: int) -> list[int]:
    return sorted(int(key.split("_clients")[1]) for key, r in appends.items()
                  if key.startswith(f"batch{batch}_") and "events_per_s" in r)


def _ok(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def throughput(results: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    series = _series(results)
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(15, 5.2), sharey=True)
    copy_in = results.get("raw_copy_in_events_per_s")
    one_row = results.get("insert_commit_events_per_s")
    for ax, batch in zip(axes, BATCHES, strict=True):
        ticks: set[int] = set()
        points: dict[int, list[tuple[float, str]]] = {}
        for legend, colour, marker, appends in series:
            xs = _clients(appends, batch)
            ys = [appends[f"batch{batch}_clients{x}"]["events_per_s"] for x in xs]
            if not xs:
                continue
            ticks.update(xs)
            ax.plot(xs, ys, marker=marker, color=colour, label=legend, linewidth=2)
            for x, y in zip(xs, ys, strict=True):
                points.setdefault(x, []).append((y, colour))
        # At each x the highest value is labelled above its point, the lowest below, any other
        # to the right, so that close lines keep legible labels.
        for x, here in points.items():
            here.sort()
            for rank, (y, colour) in enumerate(here):
                offset, align = (((0, 7), "center") if rank == len(here) - 1 else
                                 ((0, -14), "center") if rank == 0 else ((9, -3), "left"))
                ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=offset,
                            ha=align, fontsize=8, color=colour,
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                                  "alpha": 0.8})
        if _ok(copy_in):
            ax.axhline(copy_in, color="0.35", linestyle="--", linewidth=1.2,
                       label=f"PostgreSQL raw binary COPY, 1,000 rows/tx ({copy_in:,.0f})")
        if _ok(one_row):
            ax.axhline(one_row, color="0.35", linestyle=":", linewidth=1.2,
                       label=f"PostgreSQL one-row INSERT + COMMIT ({one_row:,.0f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.margins(y=0.12)  # room for the labels above the highest and below the lowest point
        if ticks:
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
        ax.set_title(f"batch of {batch} event{'s' if batch > 1 else ''} per append")
        ax.set_xlabel("concurrent clients")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("events/s (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(_title(results, "Append throughput"), fontsize=12)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(results: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    series = _series(results)
    live = [r for r in results.get("latency", []) if _ok(r.get("p50_ms"))]
    fig = plt.figure(figsize=(15, 9.5 if live else 5.6))
    grid = fig.add_gridspec(2 if live else 1, len(BATCHES), height_ratios=[3, 2] if live else [1])
    width = 0.8 / max(1, len(series))
    top = None
    for column, batch in enumerate(BATCHES):
        ax = fig.add_subplot(grid[0, column], sharey=top)
        top = top or ax
        clients = sorted({c for *_, appends in series for c in _clients(appends, batch)})
        for i, (legend, colour, _marker, appends) in enumerate(series):
            for j, c in enumerate(clients):
                r = appends.get(f"batch{batch}_clients{c}", {})
                if not _ok(r.get("p50_ms")):
                    continue
                x = j + (i - (len(series) - 1) / 2) * width
                ax.vlines(x, r["p50_ms"], r["p99_ms"], color=colour, linewidth=2.5)
                ax.plot([x], [r["p50_ms"]], "o", color=colour, markersize=6,
                        label=legend if j == 0 else None)
                ax.plot([x], [r["p95_ms"]], "D", color=colour, markersize=4,
                        markerfacecolor="white")
                ax.plot([x], [r["p99_ms"]], "_", color=colour, markersize=14, markeredgewidth=2)
        ax.set_xticks(range(len(clients)), [str(c) for c in clients])
        ax.set_yscale("log")
        ax.set_title(f"append, batch of {batch}")
        ax.set_xlabel("concurrent clients")
        ax.grid(True, axis="y", which="both", alpha=0.25)
        if column == 0:
            ax.set_ylabel("ms per request (log scale)")
            ax.legend(fontsize=8, loc="upper left")
    if live:
        ax = fig.add_subplot(grid[1, :])
        keys = [k for k in ("p50_ms", "p95_ms", "p99_ms") if any(_ok(r.get(k)) for r in live)]
        bar = 0.8 / len(keys)
        shades = {"p50_ms": "#9ecae1", "p95_ms": "#4292c6", "p99_ms": "#08519c"}
        for i, key in enumerate(keys):
            xs = [j + (i - (len(keys) - 1) / 2) * bar for j in range(len(live))]
            ys = [r.get(key) if _ok(r.get(key)) else 0.0 for r in live]
            bars = ax.bar(xs, ys, bar * 0.95, color=shades[key], label=key.removesuffix("_ms"))
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(live)), [f"{r['subscribers']} subscriber"
                                         f"{'s' if r['subscribers'] != 1 else ''}" for r in live])
        ax.set_ylabel("ms, commit to delivery")
        ax.set_title("live SubscribeToAll delivery (ours), one writer at a steady rate")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.25)
    fig.suptitle(_title(results, "Latency") + "\nappends: dot = p50, diamond = p95, bar = p99;"
                 " the line spans p50 to p99", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(results: dict[str, Any], what: str) -> str:
    env = results.get("environment", {})
    pg = env.get("postgres", {})
    bits = [f"{what} ({results.get('mode', '?')} run"]
    if env.get("cpus"):
        bits.append(f"{env['cpus']} CPUs")
    if isinstance(pg, dict) and pg.get("server_version"):
        bits.append(f"PostgreSQL {pg['server_version']}")
    if env.get("time"):
        bits.append(env["time"])
    return ", ".join(bits) + ")"


def write(result_path: Path) -> list[Path]:
    """Draw the charts of the result at `result_path` next to it; the paths written, or [] when
    matplotlib is not installed (after one line saying so)."""
    try:
        import matplotlib
    except ImportError:
        print("charts skipped: matplotlib is not installed (pip install -e '.[bench]')",
              flush=True)
        return []
    matplotlib.use("Agg")
    results = json.loads(result_path.read_text())
    stem = result_path.with_suffix("")
    paths = [Path(f"{stem}-throughput.png"), Path(f"{stem}-latency.png")]
    throughput(results, paths[0])
    latency(results, paths[1])
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path)
    args = parser.parse_args()
    for path in write(args.result):
        print(f"chart: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
