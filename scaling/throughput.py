"""The plan's time model, fitted to a run: a spec's `throughput` constants (model FLOP/s per process, the host's
floor per step, a cell's start-up) estimate each cell as max(FLOPs / rate, steps x floor) + start-up. Guessed, they
under-planned the fifth study run by 13% (149 planned, 172 measured process-minutes); fitted to the cells a run
measured (`results.csv`: train_s + startup_s, compile included), the next plan of that host and packing is the
run's own. Imports no torch.

    python -m scaling calibrate SPEC [RESULTS.csv]   # default: the spec's OUT/results.csv
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

NEEDED = ("flops", "steps", "train_s", "startup_s")


def measured(path: str | Path) -> dict:
    """Per finished cell: its FLOPs (the spec's convention), optimizer steps, and process seconds (start-up and
    training, the first steps' compile included: what the plan's estimate stands for). A row without those
    (a CSV from before the driver recorded start-up) is skipped and counted (`skipped`)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    usable = [r for r in rows if all((r.get(k) or "").strip() for k in NEEDED)]
    if not usable:
        raise ValueError(f"{path}: no row has {', '.join(NEEDED)}: nothing to calibrate from")
    return {
        "flops": np.array([float(r["flops"]) for r in usable]),
        "steps": np.array([float(r["steps"]) for r in usable]),
        "seconds": np.array([float(r["train_s"]) + float(r["startup_s"]) for r in usable]),
        "skipped": len(rows) - len(usable),
    }


def predict(cells: dict, flops_per_s: float, step_s: float, startup_s: float, nproc: int = 1) -> np.ndarray:
    """scaling.plan's estimate, in seconds, for each cell (a cosine cell: no WSD branch)."""
    return np.maximum(cells["flops"] / (flops_per_s * nproc), cells["steps"] * step_s) + startup_s


def calibrate(cells: dict, nproc: int = 1) -> dict:
    """The constants that minimise the squared log-ratio of planned to measured seconds over the cells (each cell
    weighs alike, long or short), from several starts (the max() makes the surface piecewise)."""
    seconds = cells["seconds"]

    def residuals(x):
        return np.log(predict(cells, *np.exp(x), nproc=nproc) / seconds)

    base = np.log([np.median(cells["flops"] / seconds) / nproc, np.median(seconds / cells["steps"]), 10.0])
    best = None
    for shift in ([0, 0, 0], [1, -1, 1], [-1, 1, -1], [2, -0.5, 2], [0, -2, 1.5]):
        fit = least_squares(residuals, base + np.array(shift, dtype=float))
        if best is None or fit.cost < best.cost:
            best = fit
    flops_per_s, step_s, startup_s = np.exp(best.x)
    return {"flops_per_s": float(flops_per_s), "step_s": float(step_s), "startup_s": float(startup_s)}


def errors(cells: dict, flops_per_s: float, step_s: float, startup_s: float, nproc: int = 1) -> dict:
    planned = predict(cells, flops_per_s, step_s, startup_s, nproc)
    rel = np.abs(planned / cells["seconds"] - 1)
    return {
        "planned_min": float(planned.sum() / 60),
        "measured_min": float(cells["seconds"].sum() / 60),
        "median_abs_error": float(statistics.median(rel)),
        "max_abs_error": float(rel.max()),
    }


def describe(cells: dict, spec_throughput, nproc: int = 1) -> str:
    """What the spec's constants plan against what the cells took, and the fitted constants as a spec line."""
    old = (spec_throughput.flops_per_s, spec_throughput.step_s, spec_throughput.startup_s)
    fit = calibrate(cells, nproc)
    e_old, e_new = errors(cells, *old, nproc=nproc), errors(cells, **fit, nproc=nproc)

    def line(e):
        return (
            f"plans {e['planned_min']:.1f} process-minutes, each cell within {100 * e['median_abs_error']:.0f}% "
            f"(median) and {100 * e['max_abs_error']:.0f}% (worst)"
        )

    skipped = f" ({cells['skipped']} row(s) without them skipped)" if cells.get("skipped") else ""
    return "\n".join(
        [
            f"{len(cells['seconds'])} cells measured: {e_old['measured_min']:.1f} process-minutes{skipped}",
            f"the spec's throughput {{flops_per_s: {old[0]:.3g}, startup_s: {old[2]:.3g}, step_s: {old[1]:.3g}}} "
            + line(e_old),
            f"fitted:  throughput: {{flops_per_s: {fit['flops_per_s']:.3g}, startup_s: {fit['startup_s']:.3g}, "
            f"step_s: {fit['step_s']:.3g}}} " + line(e_new),
        ]
    )
