"""Compare a benchmark result with a committed baseline; exit 1 on a regression.

    python benches/compare.py RESULT.json benches/baseline.json [--tolerance 0.4]

Only ratios to in-run baselines are gated (events/s of ours divided by PostgreSQL's own rate on
the same table in the same run), so a faster or slower machine does not trip the gate. A gated
ratio regresses when it falls below baseline × (1 − tolerance); the tolerance is wide because a
2-core machine shared with other work is noisy. Everything that moved is printed.

To refresh the baseline deliberately: run `python benches/run.py --quick` a few times on the
reference machine, check the figures, and copy the ratios of a typical run into
benches/baseline.json in a commit that says why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="allowed relative drop (default: the baseline file's)")
    args = parser.parse_args()
    result = json.loads(args.result.read_text())["ratios"]
    baseline = json.loads(args.baseline.read_text())
    tolerance = args.tolerance if args.tolerance is not None else baseline["tolerance"]
    failed = []
    print(f"{'ratio':<34} {'baseline':>9} {'now':>9} {'change':>8}")
    for name, base in baseline["ratios"].items():
        if name not in result:
            print(f"{name:<34} {base:9.3f} {'missing':>9}")
            failed.append(name)
            continue
        now = result[name]
        change = now / base - 1
        regressed = now < base * (1 - tolerance)
        mark = "  REGRESSED" if regressed else ""
        print(f"{name:<34} {base:9.3f} {now:9.3f} {change:+8.1%}{mark}")
        if regressed:
            failed.append(name)
    if failed:
        print(f"\n{len(failed)} gated ratio(s) regressed beyond {tolerance:.0%}: "
              + ", ".join(failed), file=sys.stderr)
        return 1
    print(f"\nno gated ratio regressed beyond {tolerance:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
