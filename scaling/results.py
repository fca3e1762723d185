"""OUT/results.csv: one row per finished cell, appended once, never rewritten except to widen the header when a
cell brings a new per-source column (losses, and the epochs of each source it read). The FLOPs under both
conventions are kept; `flops` is the spec's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from scaling.plan import Cell

RESULT_FIELDS = [
    "key",
    "recipe",
    "size",
    "budget",
    "seed",
    "params",
    "params_total",
    "params_non_embedding",
    "tokens",
    "flops",
    "flops_convention",
    "flops_6n",
    "flops_6n_attn",
    "steps",
    "tokens_per_step",
    "rows",
    "micro_rows",
    "grad_accum",
    "lr",
    "lr_scale",
    "beta2",
    "warmup_steps",
    "loss",
    "wall_s",
    "train_s",
    "startup_s",
    "warmup_s",
    # the trainer's start-up stages, in its order (summary `startup_phases`, the cell's last process)
    "startup_launch_s",
    "startup_distributed_s",
    "startup_engine_s",
    "startup_resume_s",
    "startup_objective_s",
    "startup_rest_s",
    "warm_start",  # 1: the cell's last process had trained other cells before (scaling.worker), 0: a fresh one
]


def has_summary(cell: Cell) -> bool:
    return (cell.run_dir / "summary.json").exists()


def finished(cell: Cell, recorded: set[str]) -> bool:
    """Its run wrote a summary, or (a measurement cell) its key is in `recorded`, the keys of the sweep's
    results.csv (`recorded_keys`, read once by the caller): the CSV is the sweep's record, so a sweep whose cell
    directories are gone (cleaned for disk, or a study continued on another machine from its committed results)
    does not train those cells again. Keys hash the training config, so a row from a config since changed matches
    no cell."""
    return has_summary(cell) or (not cell.is_trunk and cell.key in recorded)


def recorded_keys(out: str | Path) -> set[str]:
    path = Path(out) / "results.csv"
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {r["key"] for r in csv.DictReader(f)}


def warmup(summary: dict) -> float | str:
    """Seconds of the cell's first steps beyond what as many steady steps take: its compile, which the trainer
    counts in train_s. Empty for a run that did not time them."""
    first, n, steps = summary.get("first_steps_s"), summary.get("first_steps", 0), summary["steps"]
    if first is None or not n or steps <= n:
        return ""
    steady = (summary["train_s"] - first) / (steps - n)
    return round(max(0.0, first - n * steady), 3)


def record(out: str | Path, cell: Cell, flops_convention: str) -> bool:
    """Append the cell's row to OUT/results.csv unless it is there already; True when a row was written."""
    path = Path(out) / "results.csv"
    summary = json.loads((cell.run_dir / "summary.json").read_text())
    val = summary.get("final_val", {})
    flops = {"6n": summary["flops_6n"], "6n+attn": summary["flops"]}  # as trained, in both conventions
    row = {
        "key": cell.key,
        "recipe": cell.recipe,
        "size": cell.size,
        "budget": cell.budget,
        "seed": cell.seed,
        "params": cell.params,
        "params_total": cell.params_total,
        "params_non_embedding": cell.params_non_embedding,
        "tokens": summary["tokens"],
        "flops": flops[flops_convention],
        "flops_convention": flops_convention,
        "flops_6n": flops["6n"],
        "flops_6n_attn": flops["6n+attn"],
        "steps": summary["steps"],
        "tokens_per_step": cell.tokens_per_step,
        "rows": cell.rows,
        "micro_rows": cell.micro_rows,
        "grad_accum": cell.grad_accum,
        "lr": cell.lr,
        "lr_scale": cell.lr_scale,
        "beta2": cell.beta2,
        "warmup_steps": cell.warmup_steps,
        "loss": val.get("text_loss"),
        "wall_s": summary["wall_s"],
        "train_s": summary.get("train_s", summary["wall_s"]),
        "startup_s": summary.get("startup_s", 0.0),
        "warmup_s": warmup(summary),
    }
    for k, v in val.items():
        if k.endswith("/text_loss"):
            row["loss_" + k.split("/")[0]] = v
    for key, value in summary.get("final_tasks", {}).items():  # task scores, for a fit of a downstream column
        parts = key.split("/")
        if len(parts) == 3:  # task/<name>/<metric>: the model's score (baselines and timings stay in the summary)
            row[f"task_{parts[1]}_{parts[2]}"] = value
    for name, epochs in summary.get("data_epochs", {}).items():
        row["epochs_" + name] = round(epochs, 4)
    for name, seconds in summary.get("startup_phases", {}).items():  # the last process's start-up, stage by stage
        row[f"startup_{name}_s"] = seconds
    if "warm_start" in summary:
        row["warm_start"] = int(summary["warm_start"])
    return append_rows(path, [row]) == 1


def append_rows(path: Path, rows: list[dict]) -> int:
    """Append to the results CSV at `path` the rows whose key has none yet, in one read and one write; returns
    how many were written."""
    existing, header = [], []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            existing, header = list(reader), list(reader.fieldnames or [])
    keys, new = {r["key"] for r in existing}, []
    for r in rows:
        if r["key"] not in keys:
            keys.add(r["key"])
            new.append(r)
    if not new:
        return 0
    extra = sorted({k for r in new for k in r if k not in RESULT_FIELDS})
    new_columns = [k for k in RESULT_FIELDS + extra if k not in header]
    fields = header + new_columns
    if header and new_columns:  # a new loss column: rewrite once with the wider header
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(existing)
        tmp.replace(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if not header:
            w.writeheader()
        w.writerows(new)
    return len(new)


def adopt(out: str | Path, cells: list[Cell], source: str | Path) -> int:
    """Copy into OUT/results.csv the rows of another sweep's results CSV whose key is one of `cells` (the same
    training config, so the same run: an LR check's factor-1 cells are its study's own), under this sweep's recipe
    name and with `reused_from` naming the source (their device time was spent in that sweep: `scaling time` leaves
    them out); they count as finished from then on. A row the source itself reused keeps the name of the sweep that
    trained it. Returns how many rows were copied."""
    by_key = {c.key: c for c in cells if not c.is_trunk}
    with open(source, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("key") in by_key]
    path = Path(out) / "results.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    named = [{**r, "recipe": by_key[r["key"]].recipe, "reused_from": r.get("reused_from") or str(source)} for r in rows]
    return append_rows(path, named)


def loss_columns(out: str | Path) -> list[str]:
    with open(Path(out) / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    return [h for h in header if h == "loss" or h.startswith("loss_")]
