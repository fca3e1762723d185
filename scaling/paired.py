"""Two recipes compared cell by cell, with no law: the loss difference over cells both trained at the same N and
D (same size, budget and seed), with a bootstrap interval over those cells. A sweep whose fit does not determine
its law still says which recipe reached the lower loss where both were run, and by how much."""

from __future__ import annotations

import numpy as np

from scaling.fit import interval


def paired_difference(data: dict, col: str, base: str, other: str, bootstrap: int, seed: int, level: float):
    """`other` minus `base` in `col` over their shared (N, D) cells, overall and at the largest shared budget;
    None when they share no cell."""
    recipe = data["recipe"]
    at = {(data["params"][i], data["tokens"][i]): i for i in np.flatnonzero(recipe == base)}
    pairs = [(at[k], i) for i in np.flatnonzero(recipe == other) if (k := (data["params"][i], data["tokens"][i])) in at]
    if not pairs:
        return None
    b, o = np.array(pairs).T
    diff = data[col][o] - data[col][b]
    flops = data["flops"][o]
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


def describe_paired(p: dict, base: str) -> str:
    ci = p.get("interval")
    span = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    top = p["largest_budget"]
    return (
        f"{p['mean']:+.4f}{span} against {base} over {p['cells']} shared cells (lower in {p['lower_in']}); at "
        f"{top['flops']:.3g} FLOPs {top['mean']:+.4f} over {top['cells']} (lower in {top['lower_in']})"
    )
