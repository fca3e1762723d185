"""Approach 2 (Hoffmann et al. 2022): one parabola in log N per FLOP budget, power laws through the minima.

A budget whose minimum lies at the edge of its size grid, or whose parabola opens downward, is rejected and
reported. Intervals come from a bootstrap that resamples runs within each budget (a size's runs together); in a
resample where a budget's parabola has no interior minimum, that budget's best observed size stands in for it
(counted as a fallback), so that every resample yields exponents and none is dropped.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from scaling.conventions import CostModel
from scaling.fit import cell_indices, cell_resample, interval
from scaling.runs import budgets


def _minimum(logn: np.ndarray, loss: np.ndarray) -> tuple[float | None, tuple, str]:
    """(x*, parabola, reason): x* = log N at the parabola's interior minimum, or None with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        c2, c1, c0 = np.polyfit(logn, loss, 2)
    if c2 <= 0:
        return None, (c2, c1, c0), "the parabola opens downward: no minimum"
    x_star = -c1 / (2 * c2)
    if np.argmin(loss) in (np.argmin(logn), np.argmax(logn)) or not logn.min() < x_star < logn.max():
        return None, (c2, c1, c0), "the minimum is at the edge of the size grid: extend the grid"
    return x_star, (c2, c1, c0), ""


def _power_laws(minima: list[tuple[float, float, float]]) -> tuple[float, float, float, float]:
    """(N exponent, N coefficient, D exponent, D coefficient) through (C, N*, D*) points."""
    logC = np.log([m[0] for m in minima])
    a, logk = np.polyfit(logC, np.log([m[1] for m in minima]), 1)
    b, logkd = np.polyfit(logC, np.log([m[2] for m in minima]), 1)
    return float(a), math.exp(logk), float(b), math.exp(logkd)


def fit_approach2(
    N, D, L, flops, cost: CostModel | None = None, bootstrap: int = 0, seed: int = 0, target=None, level=0.95
) -> dict:
    cost = cost or CostModel()
    labels = budgets(flops)
    minima, rejected, curves = [], [], {}
    groups = []
    for C in sorted(set(labels)):
        sel = np.flatnonzero(labels == C)
        if len(set(N[sel])) < 3:
            rejected.append({"flops": C, "reason": f"{len(set(N[sel]))} sizes (needs 3)"})
            continue
        x, loss = np.log(N[sel]), L[sel]
        groups.append((C, x, loss))
        x_star, (c2, c1, c0), reason = _minimum(x, loss)
        curves[C] = (c2, c1, c0, x.min(), x.max())
        if x_star is None:
            rejected.append({"flops": C, "reason": reason})
            continue
        n_star = math.exp(x_star)
        d_star = float(cost.tokens(C, n_star))
        minima.append({"flops": C, "N": n_star, "D": d_star, "loss": c0 + c1 * x_star + c2 * x_star**2})
    result = {
        "approach": 2,
        "budgets": len(set(labels)),
        "minima": minima,
        "rejected": rejected,
        "curves": {str(k): v for k, v in curves.items()},
    }
    if len(minima) < 2:
        result["error"] = f"{len(minima)} usable budget(s): a power law needs at least 2"
        return result
    a, kn, b, kd = _power_laws([(m["flops"], m["N"], m["D"]) for m in minima])
    result.update({"N_exponent": a, "N_coefficient": kn, "D_exponent": b, "D_coefficient": kd})
    target = float(target or max(m["flops"] for m in minima))
    result["target_flops"] = target
    result["N_at_target"] = kn * target**a
    if bootstrap:
        result.update(_bootstrap(groups, cost, bootstrap, seed, target, level))
    return result


def _bootstrap(groups, cost, bootstrap, seed, target, level) -> dict:
    rng = np.random.default_rng(seed)
    a_s, b_s, n_s, fallbacks = [], [], [], 0
    for _ in range(bootstrap):
        points = []
        for C, x, loss in groups:
            idx = cell_resample(cell_indices(x), rng)  # a size's runs together (seeds, repeats)
            x_star = _minimum(x[idx], loss[idx])[0] if len(set(x[idx])) >= 3 else None
            if x_star is None:
                fallbacks += 1
                x_star = x[idx][np.argmin(loss[idx])]
            n_star = math.exp(x_star)
            points.append((C, n_star, float(cost.tokens(C, n_star))))
        if len({p[1] for p in points}) < 2:  # every budget at one size: the exponent is 0 by this resample
            a, kn, b, kd = 0.0, points[0][1], 1.0, points[0][2] / points[0][0]
        else:
            a, kn, b, kd = _power_laws(points)
        a_s.append(a)
        b_s.append(b)
        n_s.append(kn * target**a)
    total = bootstrap * len(groups)
    out = {
        "bootstrap": bootstrap,
        "level": level,
        "interval": {
            "N_exponent": interval(a_s, level),
            "D_exponent": interval(b_s, level),
            "N_at_target": interval(n_s, level),
        },
        "bootstrap_fallbacks": fallbacks,
        "bootstrap_fallback_share": fallbacks / total if total else 0.0,
    }
    if total and fallbacks / total > 0.05:
        warnings.warn(
            f"approach 2: in {fallbacks / total:.0%} of resampled budgets the parabola had no interior minimum "
            f"(the best observed size stood in)",
            stacklevel=2,
        )
    return out
