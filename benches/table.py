"""The end-of-run summary of a benchmark result, as plain-text tables.

    python benches/table.py RESULT.json [--baseline benches/baseline.json]

run.py prints it after every run: appends (ours next to PostgreSQL's raw COPY and one-row
INSERT + COMMIT on the same table, and next to the peers), their latencies, reads, live delivery,
and the ratios (the gated ones beside the committed baseline). Missing parts of a result (a
skipped peer, an older result file) are left out or shown as "-".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).resolve().parent / "baseline.json"
PEER_TITLES = {"eventsourcing": "eventsourcing", "umadb": "UmaDB"}


def _num(value: Any, digits: int = 0) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _ms(r: dict[str, Any] | None) -> str:
    if not r or "p50_ms" not in r:
        return "-"
    return " / ".join(_num(r.get(key), 1 if r.get(key, 0) < 100 else 0)
                      for key in ("p50_ms", "p95_ms", "p99_ms"))


def _grid(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Columns padded to their widest cell; the columns in `left` left-aligned, others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(w) if i in left else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _loads(appends: dict[str, Any]) -> list[tuple[int, int]]:
    """(batch, clients) of every load, by clients then batch."""
    pairs = []
    for key in appends:
        batch, clients = key.removeprefix("batch").split("_clients")
        pairs.append((int(batch), int(clients)))
    return sorted(pairs, key=lambda p: (p[1], p[0]))


def render(results: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    out: list[str] = []
    appends: dict[str, Any] = results.get("appends", {})
    peers = {name: peer for name, peer in results.get("peers", {}).items()
             if isinstance(peer.get("appends"), dict)}
    skipped = {name: peer["skipped"] for name, peer in results.get("peers", {}).items()
               if "skipped" in peer}

    # Appends: throughput.
    out.append("APPENDS  events/s (ratio = ours / peer; cpu = our server's CPU s per 1,000 events)")
    header = ["load", "ours", "cpu"] + [PEER_TITLES.get(n, n) for n in peers]
    header += [f"vs {PEER_TITLES.get(n, n)}" for n in peers]
    rows = []
    for batch, clients in _loads(appends):
        key = f"batch{batch}_clients{clients}"
        ours = appends[key]
        row = [f"batch {batch:>3} x {clients:>2} clients", _num(ours.get("events_per_s")),
               _num(ours.get("server_cpu_s_per_1000_events"), 3)]
        theirs = [peer["appends"].get(key, {}) for peer in peers.values()]
        row += [_num(t.get("events_per_s")) for t in theirs]
        row += [_num(ours["events_per_s"] / t["events_per_s"], 2) if t.get("events_per_s")
                else "-" for t in theirs]
        rows.append(row)
    out += _grid(header, rows)
    out.append(f"  PostgreSQL, same table: raw binary COPY "
               f"{_num(results.get('raw_copy_in_events_per_s'))} ev/s (1,000 rows a "
               f"transaction); one-row INSERT + COMMIT "
               f"{_num(results.get('insert_commit_events_per_s'))} ev/s (sequential)")
    for name, reason in skipped.items():
        out.append(f"  {PEER_TITLES.get(name, name)}: skipped: {reason}")

    # Appends: latency.
    out.append("")
    out.append("APPEND LATENCY  ms per request, p50 / p95 / p99")
    header = ["load", "ours"] + [PEER_TITLES.get(n, n) for n in peers]
    rows = []
    for batch, clients in _loads(appends):
        key = f"batch{batch}_clients{clients}"
        rows.append([f"batch {batch:>3} x {clients:>2} clients", _ms(appends[key])]
                    + [_ms(peer["appends"].get(key)) for peer in peers.values()])
    out += _grid(header, rows)

    # Reads.
    out.append("")
    out.append("READS  events/s")
    rows = []
    for what, ours_key, theirs, theirs_key in (
        ("GetEvents, one 10k-event stream", "get_events_events_per_s",
         "COPY TO STDOUT, same rows", "copy_out_events_per_s"),
        ("SubscribeToAll catch-up", "catch_up_events_per_s",
         "COPY TO STDOUT, all rows", "catch_up_copy_out_events_per_s"),
        ("ReadAll, pages of 1,000", "read_all_events_per_s",
         "COPY TO STDOUT, all rows", "read_all_copy_out_events_per_s"),
    ):
        ours, base = results.get(ours_key), results.get(theirs_key)
        rows.append([what, _num(ours), theirs, _num(base),
                     _num(ours / base, 2) if ours and base else "-"])
    out += _grid(["read", "ours", "PostgreSQL", "", "ratio"], rows, left=(0, 2))
    if "rebuild_with_snapshot_ms" in results:
        out.append(f"  rebuild of a 10k-event stream: snapshot + 100 events "
                   f"{_num(results['rebuild_with_snapshot_ms'], 2)} ms, full replay "
                   f"{_num(results.get('rebuild_full_replay_ms'), 2)} ms")
    if "noop_unary_calls_per_s" in results:
        out.append(f"  no-op purerpc server: unary, 64 clients "
                   f"{_num(results['noop_unary_calls_per_s'])} calls/s; streaming "
                   f"{_num(results.get('noop_streaming_messages_per_s'))} messages/s")
    single = results.get("noop_unary_clients1")
    if isinstance(single, dict):
        out.append(f"  no-op purerpc server, 1 sequential client: p50 "
                   f"{_num(single.get('p50_ms'), 2)} ms, p99 {_num(single.get('p99_ms'), 2)} ms"
                   f" (the transport's latency floor)")

    # Live delivery.
    live = results.get("latency", [])
    if live:
        out.append("")
        out.append("LIVE  commit-to-delivery latency, ms")
        rows = [[str(r.get("subscribers")), _num(r.get("p50_ms"), 2), _num(r.get("p95_ms"), 2),
                 _num(r.get("p99_ms"), 2), f"{r.get('deliveries', '-')}/{r.get('expected', '-')}"]
                for r in live]
        out += _grid(["subscribers", "p50", "p95", "p99", "delivered"], rows)

    # Ratios.
    # ours / peer ratios are in the APPENDS table already.
    ratios = {name: value for name, value in results.get("ratios", {}).items()
              if not any(name.endswith(f"_vs_{peer}") for peer in results.get("peers", {}))}
    if ratios:
        gated = (baseline or {}).get("ratios", {})
        tolerance = (baseline or {}).get("tolerance", 0.0)
        out.append("")
        out.append(f"RATIOS  gated ones against benches/baseline.json (tolerance {tolerance:.0%})")
        rows = []
        for name in sorted(ratios, key=lambda n: (n not in gated, n)):
            now = ratios[name]
            if name in gated:
                floor = gated[name] * (1 - tolerance)
                verdict = "ok" if now >= floor else f"REGRESSED (< {floor:.2f})"
                rows.append([name, _num(now, 2), _num(gated[name], 2), verdict])
            else:
                rows.append([name, _num(now, 2), "", "informational"])
        out += _grid(["ratio", "now", "baseline", "gate"], rows)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    args = parser.parse_args()
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else None
    print(render(json.loads(args.result.read_text()), baseline))


if __name__ == "__main__":
    main()
