"""The training loss at the end of each cell of a sweep directory, from the cells' own metrics.jsonl: for cells that
have no validation loss (a sweep stopped midway, or cells that failed at their final evaluation, as the fourth
study design's first LR check did; docs/study/STUDY.md). Training loss on data no cell repeats is a fair, noisier
stand-in for the validation loss, and is labelled as what it is.

    python benchmarks/train_tail.py runs/sweeps/study4-lr --last 4 --csv docs/study/study4-lr-attempt.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

FIELDS = ["key", "depth", "lr", "steps", "last_step", "train_loss_tail", "windows", "tokens_per_s"]


def tail(cell_dir: Path, last: int) -> dict | None:
    metrics = cell_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    cfg = yaml.safe_load((cell_dir / "cell.yaml").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("loss") is not None]
    if not train:
        return None
    steady = train[2:] or train  # the first windows include compilation
    return {
        "key": cell_dir.name,
        "depth": cfg["model"]["n_layers"],
        "lr": cfg["optim"]["lr"],
        "steps": cfg["steps"],
        "last_step": train[-1]["step"],
        "train_loss_tail": sum(r["loss"] for r in train[-last:]) / len(train[-last:]),
        "windows": len(train[-last:]),
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", help="a sweep's out directory (its cells/ hold each cell's metrics.jsonl)")
    ap.add_argument("--last", type=int, default=4, help="logged windows averaged at the end")
    ap.add_argument("--csv")
    args = ap.parse_args(argv)
    rows = [r for d in sorted(Path(args.sweep_dir, "cells").iterdir()) if (r := tail(d, args.last))]
    rows.sort(key=lambda r: (r["depth"], r["lr"]))
    for r in rows:
        print(
            f"depth {r['depth']:>2}  lr {r['lr']:.4g}  step {r['last_step']}/{r['steps']}  "
            f"train loss (last {r['windows']} windows) {r['train_loss_tail']:.4f}  {r['tokens_per_s']:,.0f} tokens/s"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
