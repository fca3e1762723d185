"""A cell's compile, from its training log, for runs whose cells did not time their first steps (results.csv without
`warmup_s`): the first logging window's time beyond what the same steps take at the run's steady rate (the median of
the later windows). The trainer prints `batch N tokens a step` once and `step S/... tokens_per_s=X` every window.

    python benchmarks/first_steps.py LOG_DIR [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

BATCH = re.compile(r"^batch\s+([\d,]+) tokens a step", re.M)
WINDOW = re.compile(r"^step (\d+)/\d+ eta \S+ .*?tokens_per_s=([\d.e+]+)", re.M)


def first_window_excess(text: str) -> float | None:
    """Seconds the first window took beyond the steady rate; None for a log with fewer than three windows (or one
    that resumed: its first window is not the run's)."""
    batch = BATCH.search(text)
    windows = [(int(s), float(x)) for s, x in WINDOW.findall(text)]
    if batch is None or len(windows) < 3 or "resumed from" in text:
        return None
    tokens = int(batch.group(1).replace(",", ""))
    steady = statistics.median(x for _, x in windows[2:])
    steps = windows[0][0]
    return steps * tokens / windows[0][1] - steps * tokens / steady


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log_dir")
    ap.add_argument("--json")
    args = ap.parse_args()
    cells = {p.stem: first_window_excess(p.read_text()) for p in sorted(Path(args.log_dir).glob("*.log"))}
    known = [v for v in cells.values() if v is not None]
    summary = {
        "cells": len(cells),
        "measured": len(known),
        "sum_s": sum(known),
        "median_s": statistics.median(known) if known else None,
        "min_s": min(known, default=None),
        "max_s": max(known, default=None),
    }
    for key, v in cells.items():
        print(f"{key}  {'-' if v is None else f'{v:.1f} s'}")
    print(
        f"{summary['measured']} of {summary['cells']} logs: first window beyond the steady rate, sum "
        f"{summary['sum_s']:.0f} s, median {summary['median_s']:.1f} s (min {summary['min_s']:.1f}, max "
        f"{summary['max_s']:.1f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": cells, **summary}, indent=1))


if __name__ == "__main__":
    main()
