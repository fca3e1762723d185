"""How much a cell's result moves when it is trained again: two results CSVs holding the same cells (the same keys:
the same config, seed and data), e.g. a check rerun on another machine. Each loss column's absolute differences
(median and largest, and at which cell), and each run's first steps (`warmup_s`, the compile): how far apart two
losses must be before a comparison of cells means anything. Imports no torch.

    python -m scaling repeats FIRST.csv AGAIN.csv [--loss loss ...]
"""

from __future__ import annotations

import statistics
from pathlib import Path

from scaling.lrcheck import read_rows


def _trained(path: str | Path) -> dict[str, dict]:
    """Key -> row, the rows this sweep trained itself (a row copied with `scaling run --reuse` is another run's)."""
    return {r["key"]: r for r in read_rows(path) if not r.get("reused_from")}


def repeats(first: str | Path, again: str | Path, losses=("loss", "loss_caption", "loss_text")) -> dict:
    a, b = _trained(first), _trained(again)
    keys = sorted(a.keys() & b.keys())
    if not keys:
        raise ValueError(f"{first} and {again} share no cell trained in both")
    out = {"cells": len(keys), "losses": {}, "warmup_s": {}}
    for col in losses:
        pairs = [(k, abs(float(b[k][col]) - float(a[k][col]))) for k in keys if a[k].get(col) and b[k].get(col)]
        if not pairs:
            continue
        worst = max(pairs, key=lambda p: p[1])
        out["losses"][col] = {
            "median_abs": statistics.median(d for _, d in pairs),
            "max_abs": worst[1],
            "max_at": f"size {a[worst[0]]['size']}, {a[worst[0]]['recipe']}, {a[worst[0]]['budget']}",
        }
    for name, rows in (("first", a), ("again", b)):
        w = sorted(float(rows[k]["warmup_s"]) for k in keys if rows[k].get("warmup_s"))
        if w:
            out["warmup_s"][name] = {"min": w[0], "max": w[-1], "sum": sum(w)}
    return out


def describe(r: dict, first: str, again: str) -> str:
    lines = [f"{r['cells']} cells trained in both {first} and {again}; |again - first|:"]
    for col, d in r["losses"].items():
        lines.append(f"  {col}: median {d['median_abs']:.4f}, at most {d['max_abs']:.4f} ({d['max_at']})")
    for name, path in (("first", first), ("again", again)):
        if name in r["warmup_s"]:
            w = r["warmup_s"][name]
            lines.append(f"first steps in {path}: {w['min']:.1f}-{w['max']:.1f} s a cell, {w['sum']:.1f} s in all")
    return "\n".join(lines)
