"""Two recipes compared cell by cell, with no law: the loss difference over cells both trained at the same N and
D (same size and budget; a cell's seeds or repeated runs at their mean), with a bootstrap interval over those
cells. A sweep whose fit does not determine its law still says which recipe reached the lower loss where both were
run, and by how much."""

from __future__ import annotations

import numpy as np

from scaling.fit import cell_indices, interval


def paired_difference(data: dict, col: str, base: str, other: str, bootstrap: int, seed: int, level: float):
    """`other` minus `base` in `col` over their shared (N, D) cells, overall and at the largest shared budget;
    None when they share no cell. A cell trained more than once (seeds, or two runs' CSVs read together) counts
    once, at the mean of its runs."""
    base_cells, other_cells = _cells(data, col, base), _cells(data, col, other)
    shared = [k for k in other_cells if k in base_cells]
    if not shared:
        return None
    diff = np.array([other_cells[k][0] - base_cells[k][0] for k in shared])
    flops = np.array([other_cells[k][1] for k in shared])
    top = flops >= flops.max() * 0.95  # the largest budget (budgets are planned to a few percent)
    rng = np.random.default_rng(seed)
    result = {"cells": len(diff), "mean": float(diff.mean()), "lower_in": int((diff < 0).sum())}
    if bootstrap:
        means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(bootstrap)]
        result["interval"] = interval(means, level)
    result["largest_budget"] = {
        "flops": float(flops[top].max()),
        "cells": int(top.sum()),
        "mean": float(diff[top].mean()),
        "lower_in": int((diff[top] < 0).sum()),
    }
    return result


def _cells(data: dict, col: str, recipe: str) -> dict:
    """(N, D) -> (mean loss over the cell's runs, its FLOPs) for one recipe."""
    rows = np.flatnonzero(data["recipe"] == recipe)
    N, D = data["params"][rows], data["tokens"][rows]
    return {
        (N[c[0]], D[c[0]]): (float(np.mean(data[col][rows[c]])), float(data["flops"][rows[c[0]]]))
        for c in cell_indices(N, D)
    }


def describe_paired(p: dict, base: str) -> str:
    ci = p.get("interval")
    span = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    top = p["largest_budget"]
    return (
        f"{p['mean']:+.4f}{span} against {base} over {p['cells']} shared cells (lower in {p['lower_in']}); at "
        f"{top['flops']:.3g} FLOPs {top['mean']:+.4f} over {top['cells']} (lower in {top['lower_in']})"
    )
