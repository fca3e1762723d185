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
    """The driver runs (start, end, slots, gpus), and how many were killed before writing their end. A killed run
    ends at its last `seen` (the driver writes one at each cell event and every 30 s, so this is at most that much
    short); one with no `seen` (a driver older than the heartbeat) ends at the next run's start, an upper bound,
    marked `end_bound`; a killed last run with neither is left out."""
    path = Path(out) / "driver.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    ends = {r["run"]: r["end"] for r in lines if "end" in r}
    seen: dict[str, float] = {}
    for r in lines:
        if "seen" in r:
            seen[r["run"]] = max(seen.get(r["run"], 0.0), r["seen"])
    starts = sorted((r for r in lines if "start" in r), key=lambda r: r["start"])
    out_ = []
    for i, s in enumerate(starts):
        if s["run"] in ends:
            out_.append({**s, "end": ends[s["run"]]})
        elif s["run"] in seen:
            out_.append({**s, "end": seen[s["run"]], "killed": True})
        elif i + 1 < len(starts):
            out_.append({**s, "end": starts[i + 1]["start"], "killed": True, "end_bound": True})
    return out_, sum(s["run"] not in ends for s in starts)


def gpu_time(out: str | Path, peak_tflops: float | None = None) -> dict:
    ended, killed = spans(out)
    dated = [s for s in ended if s.get("killed")]
    with open(Path(out) / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    reused = [r for r in rows if r.get("reused_from")]  # trained in another sweep's runs (`scaling run --reuse`)
    rows = [r for r in rows if not r.get("reused_from")]
    wall = sum(s["end"] - s["start"] for s in ended)
    slot_s = sum((s["end"] - s["start"]) * s["slots"] for s in ended)
    device_s = sum((s["end"] - s["start"]) * s["gpus"] for s in ended)
    train, startup = (sum(float(r[k]) for r in rows) for k in ("train_s", "startup_s"))
    # the cells that timed their first steps (and trained past them): their compile is start-up, not training
    warm = [float(r["warmup_s"]) for r in rows if r.get("warmup_s") not in (None, "")]
    steps = train - sum(warm)
    tokens, flops = sum(float(r["tokens"]) for r in rows), sum(float(r["flops"]) for r in rows)
    out_ = {
        "runs": len(ended),
        "runs_without_end": killed,
        "runs_dated_by_heartbeat": sum(not s.get("end_bound") for s in dated),
        "runs_dated_by_next_start": sum(bool(s.get("end_bound")) for s in dated),
        "cells": len(rows),
        "wall_s": wall,
        "run_walls_s": [s["end"] - s["start"] for s in ended],  # each driver run's, in order
        "slot_s": slot_s,
        "train_s": train,  # as the cells recorded it: their first steps' compile included
        "warmup_s": sum(warm) if warm else None,
        "cells_untimed": len(rows) - len(warm),
        "warmup_median_s": statistics.median(warm) if warm else None,
        "steps_s": steps,
        "startup_s": startup,
        "rest_s": slot_s - train - startup,
        "train_share": steps / slot_s if slot_s else None,
        "startup_share": (train - steps + startup) / slot_s if slot_s else None,
        "startup_median_s": statistics.median(float(r["startup_s"]) for r in rows) if rows else None,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        "flops": flops,
        "mfu": flops / (device_s * peak_tflops * 1e12) if peak_tflops and device_s else None,
        "startup_phases": startup_phases(rows),
        "startup_by_start": startup_by_start(rows),
        "cells_reused": len(reused),
    }
    return out_


def startup_by_start(rows: list[dict]) -> dict[str, dict]:
    """Start-up of the cells whose last process was a warm worker's next cell, and of those that started a process
    (results.csv's `warm_start`; {} for a CSV without it): count and median seconds of each."""
    out = {}
    for name, flag in (("warm", "1"), ("fresh", "0")):
        values = [float(r["startup_s"]) for r in rows if r.get("warm_start") == flag]
        if values:
            out[name] = {"cells": len(values), "median_s": statistics.median(values)}
    return out


def startup_phases(rows: list[dict]) -> dict[str, float]:
    """The median seconds of each start-up stage over the cells that recorded them (results.csv's
    `startup_<stage>_s`, from the trainer: the last process of each cell), in the order the trainer runs them."""
    names = [k for k in (rows[0] if rows else {}) if k.startswith("startup_") and k.endswith("_s") and k != "startup_s"]
    medians = {}
    for k in names:
        values = [float(r[k]) for r in rows if r.get(k) not in (None, "")]
        if values:
            medians[k.removeprefix("startup_").removesuffix("_s")] = statistics.median(values)
    return medians


def markdown(t: dict) -> str:
    def share(x):
        return f"{100 * x:.1f}%" if x is not None else "-"

    if not t["cells"]:
        return (
            f"no cell of this sweep's own has finished ({t['cells_reused']} reused from another sweep's results, "
            "whose time was spent in that sweep's runs)"
        )

    lines = [
        "| what | seconds | share |",
        "| --- | --- | --- |",
        f"| wall time of {t['runs']} driver run(s) | {t['wall_s']:.0f} | |",
        f"| cell slots x wall | {t['slot_s']:.0f} | 100% |",
        f"| training steps of the {t['cells']} finished cells | {t['steps_s']:.0f} | {share(t['train_share'])} |",
        (
            f"| their start-up (median {t['startup_median_s']:.1f} s) and first steps' compile (median "
            f"{t['warmup_median_s']:.1f} s) | {t['startup_s'] + t['warmup_s']:.0f} | {share(t['startup_share'])} |"
            if t["warmup_s"] is not None
            else f"| their start-up (median {t['startup_median_s']:.1f} s) | {t['startup_s']:.0f} "
            f"| {share(t['startup_share'])} |"
        ),
        f"| the rest | {t['rest_s']:.0f} | {share(t['rest_s'] / t['slot_s'] if t['slot_s'] else None)} |",
        "",
        f"{t['tokens']:.3g} tokens, {t['tokens_per_s'] or 0:,.0f} tokens/s of wall time"
        + (f", aggregate MFU {100 * t['mfu']:.2f}% (start-up included)" if t["mfu"] is not None else ""),
    ]
    if len(t.get("run_walls_s", [])) > 1:
        lines.append("wall time of each driver run, in order: " + ", ".join(f"{w:.0f} s" for w in t["run_walls_s"]))
    if t.get("startup_phases"):
        lines.append(
            "start-up, median seconds a cell by stage: "
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in t["startup_phases"].items())
            + " (launch: spawn and imports; engine: model, compile wrappers, optimizer; objective: the data loader)"
        )
    if t.get("startup_by_start"):
        by = t["startup_by_start"]
        lines.append(
            "start-up, median seconds a cell: "
            + "; ".join(
                f"{by[k]['median_s']:.1f} over the {by[k]['cells']} cell(s) {what}"
                for k, what in (("warm", "on a warm worker"), ("fresh", "that started a process"))
                if k in by
            )
        )
    if t.get("cells_reused"):
        lines.append(
            f"{t['cells_reused']} cell(s) reused from another sweep's results (`scaling run --reuse`) are left out: "
            "their time was spent in that sweep's runs"
        )
    if t["cells_untimed"]:
        lines.append(
            f"{t['cells_untimed']} cell(s) did not time their first steps (no warmup_s: run before the trainer did, "
            "or too short to tell them from the rest): their compile is counted in their training steps"
        )
    if t["runs_without_end"]:
        left_out = t["runs_without_end"] - t["runs_dated_by_heartbeat"] - t["runs_dated_by_next_start"]
        lines.append(
            f"{t['runs_without_end']} driver run(s) started and never recorded an end (killed): "
            f"{t['runs_dated_by_heartbeat']} end at their last heartbeat, {t['runs_dated_by_next_start']} at the next "
            f"run's start (an upper bound), {left_out} left out of the wall time (cells they finished are in the "
            "training time)"
        )
    return "\n".join(lines)
