"""Where a sweep's device time went: the driver's own spans (OUT/driver.jsonl, one `start` and one `end` line per
`python -m scaling run`) against its cells' training and start-up seconds (OUT/results.csv). The split a study
reports (training steps, start-up, the rest: idle slots, cells stopped between runs, work lost), tokens/s and the
aggregate MFU. Imports no torch.

    python -m scaling time SPEC [--peak-tflops 989]
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path


def spans(out: str | Path) -> tuple[list[dict], int]:
    """The driver runs that ended (start, end, slots, gpus), and how many started without an end (killed)."""
    path = Path(out) / "driver.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    ends = {r["run"]: r for r in lines if "end" in r}
    starts = [r for r in lines if "start" in r]
    ended = [{**s, "end": ends[s["run"]]["end"]} for s in starts if s["run"] in ends]
    return ended, len(starts) - len(ended)


def gpu_time(out: str | Path, peak_tflops: float | None = None) -> dict:
    ended, killed = spans(out)
    with open(Path(out) / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wall = sum(s["end"] - s["start"] for s in ended)
    slot_s = sum((s["end"] - s["start"]) * s["slots"] for s in ended)
    device_s = sum((s["end"] - s["start"]) * s["gpus"] for s in ended)
    train, startup = (sum(float(r[k]) for r in rows) for k in ("train_s", "startup_s"))
    tokens, flops = sum(float(r["tokens"]) for r in rows), sum(float(r["flops"]) for r in rows)
    out_ = {
        "runs": len(ended),
        "runs_without_end": killed,
        "cells": len(rows),
        "wall_s": wall,
        "slot_s": slot_s,
        "train_s": train,
        "startup_s": startup,
        "rest_s": slot_s - train - startup,
        "train_share": train / slot_s if slot_s else None,
        "startup_share": startup / slot_s if slot_s else None,
        "startup_median_s": statistics.median(float(r["startup_s"]) for r in rows) if rows else None,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        "flops": flops,
        "mfu": flops / (device_s * peak_tflops * 1e12) if peak_tflops and device_s else None,
    }
    return out_


def markdown(t: dict) -> str:
    def share(x):
        return f"{100 * x:.1f}%" if x is not None else "-"

    lines = [
        "| what | seconds | share |",
        "| --- | --- | --- |",
        f"| wall time of {t['runs']} driver run(s) | {t['wall_s']:.0f} | |",
        f"| cell slots x wall | {t['slot_s']:.0f} | 100% |",
        f"| training steps of the {t['cells']} finished cells | {t['train_s']:.0f} | {share(t['train_share'])} |",
        f"| their start-up (median {t['startup_median_s']:.1f} s) | {t['startup_s']:.0f} "
        f"| {share(t['startup_share'])} |",
        f"| the rest | {t['rest_s']:.0f} | {share(t['rest_s'] / t['slot_s'] if t['slot_s'] else None)} |",
        "",
        f"{t['tokens']:.3g} tokens, {t['tokens_per_s'] or 0:,.0f} tokens/s of wall time"
        + (f", aggregate MFU {100 * t['mfu']:.2f}% (start-up included)" if t["mfu"] is not None else ""),
    ]
    if t["runs_without_end"]:
        lines.append(
            f"{t['runs_without_end']} driver run(s) started and never recorded an end (killed): their time is not "
            "in the wall time, though cells they finished are in the training time"
        )
    return "\n".join(lines)
