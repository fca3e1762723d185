"""Approach 3 (Hoffmann et al. 2022): L(N, D) = E + A/N^alpha + B/D^beta fitted as Chinchilla did, with intervals
that do not flatter.

The fit: Huber loss (delta 1e-3) between log L and LSE(a - alpha log N, b - beta log D, e); L-BFGS-B from
Chinchilla's 4,500-point grid of starts, screened by objective value (the best `starts` run; `full_grid=True`
runs all), with tolerances tight enough not to stop early (Besiroglu et al. 2024 showed that the default ones
stop at the wrong answer).

The bootstrap resamples cells, a cell's runs together (`cell_resample`: its seeds, or the same design run twice and
read as one set, are not independent draws of its (N, D); with one run a cell this is resampling runs). Every
resample is refitted from every distinct optimum that the main fit's screened starts reached (not only the best
one), so a resample may settle in another basin; every resample is kept, and those that end near a bound or fail to
converge are counted, not dropped.

A fit is reported as not converged when the optimizer did not converge, when a parameter ends within 2% of the
search box's width from a bound, or when its 95% interval spans more than half of the box: on such data the law is
not determined, whatever the point estimate says.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import asdict

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from scaling.law import LAW_PARAMS, Law
from scaling.runs import FitError

HUBER_DELTA = 1e-3
GRID = {  # Chinchilla's grid of initialisations
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
LBFGS = {"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 50}
# The search box (a, b, e, alpha, beta): wide enough that a real fit ends well inside it.
BOUNDS = [(-50.0, 50.0), (-50.0, 50.0), (-10.0, 10.0), (0.0, 5.0), (0.0, 5.0)]
THETA_NAMES = ("log A", "log B", "log E", "alpha", "beta")
NEAR_BOUND = 0.02  # of the box's width
WIDE_INTERVAL = 0.5  # of the box's width
FLAGGED_SHARE = 0.05  # bootstrap refits on a bound or not converged: above this share the report says so


def interval(values, level: float = 0.95) -> list[float]:
    """The central `level` interval of every value given (infinite ones included: no resample is dropped)."""
    values = np.asarray(values, dtype=float)
    q = (1 - level) / 2
    return [float(v) for v in np.quantile(values, [q, 1 - q], method="inverted_cdf")]


def _objective(theta, logN, logD, logL):
    """Huber loss of the log-sum-exp prediction and its gradient (written out: scipy's logsumexp and softmax cost
    ten times more than the arithmetic at these sizes, and the bootstrap calls this millions of times)."""
    a, b, e, alpha, beta = theta
    t0, t1 = a - alpha * logN, b - beta * logD
    m = np.maximum(np.maximum(t0, t1), e)
    x0, x1, x2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    total = x0 + x1 + x2
    r = m + np.log(total) - logL
    absr = np.abs(r)
    small = absr <= HUBER_DELTA
    loss = np.where(small, 0.5 * r * r, HUBER_DELTA * (absr - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r)) / total
    w0, w1, w2 = x0 * dr, x1 * dr, x2 * dr
    return loss, np.array([w0.sum(), w1.sum(), w2.sum(), -(w0 @ logN), -(w1 @ logD)])


def _minimize(theta0, logN, logD, logL):
    return minimize(
        _objective, theta0, args=(logN, logD, logL), jac=True, method="L-BFGS-B", bounds=BOUNDS, options=LBFGS
    )


def _screen(grid: np.ndarray, logN, logD, logL, keep: int) -> np.ndarray:
    """The `keep` grid starts with the lowest objective, evaluated for the whole grid in one vectorised pass."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(grid), len(logN)))])
    r = np.abs(logsumexp(terms, axis=0) - logL)
    huber = np.where(r <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(axis=1)
    return grid[np.argsort(huber)[:keep]]


def _best_of(starts, logN, logD, logL, idx):
    """The best L-BFGS end point from `starts` on the runs `idx` (a bootstrap resample)."""
    return min((_minimize(x, logN[idx], logD[idx], logL[idx]) for x in starts), key=lambda r: r.fun)


def _law(theta) -> Law:
    a, b, e, alpha, beta = theta
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _converged(res) -> bool:
    # With tolerances at float precision L-BFGS-B often ends in an "abnormal" line search at the optimum itself:
    # call it converged when the gradient vanishes there.
    return bool(res.success) or float(np.abs(res.jac).max()) < 1e-7


def near_bounds(theta) -> list[str]:
    """The parameters within NEAR_BOUND of the box's width from one of its bounds."""
    return [n for n, v, (lo, hi) in zip(THETA_NAMES, theta, BOUNDS) if min(v - lo, hi - v) < NEAR_BOUND * (hi - lo)]


def _basins(results, limit: int) -> list[np.ndarray]:
    """The distinct end points of the main fit's starts, best first."""
    kept: list[np.ndarray] = []
    for res in sorted(results, key=lambda r: r.fun):
        if all(np.abs(res.x - k).max() > 1e-3 for k in kept):
            kept.append(res.x)
        if len(kept) == limit:
            break
    return kept


def cell_indices(*keys) -> list[np.ndarray]:
    """The runs of each distinct cell (the same value in every key array), cells in the order first seen."""
    cells: dict = {}
    for i, key in enumerate(zip(*keys)):
        cells.setdefault(key, []).append(i)
    return [np.array(v) for v in cells.values()]


def cell_resample(cells: list[np.ndarray], rng) -> np.ndarray:
    """A bootstrap resample of runs drawn cell by cell: as many cells as there are, with replacement, each with all
    its runs. With one run a cell it draws exactly what resampling runs would (the same indices from the same rng)."""
    return np.concatenate([cells[c] for c in rng.integers(0, len(cells), len(cells))])


def fit_approach3(
    N,
    D,
    L,
    bootstrap: int = 1000,
    seed: int = 0,
    full_grid: bool = False,
    starts: int = 50,
    bootstrap_starts: int = 4,
    level: float = 0.95,
) -> dict:
    if len(set(N)) < 3 or len(set(D)) < 3 or len(N) < 6:
        raise FitError(
            f"approach 3 needs at least 6 runs over at least 3 distinct sizes and 3 distinct token counts; "
            f"got {len(N)} runs, {len(set(N))} sizes, {len(set(D))} token counts"
        )
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    grid = np.array([(a, b, e, al, be) for al, be, e, a, b in itertools.product(*GRID.values())])
    if not full_grid:  # L-BFGS from the best `starts` of the 4500 (same optimum in tests/test_scaling.py, 90x faster)
        grid = _screen(grid, logN, logD, logL, starts)
    results = [_minimize(x, logN, logD, logL) for x in grid]
    best = min(results, key=lambda r: r.fun)
    basins = _basins(results, bootstrap_starts)
    law = _law(best.x)

    rng = np.random.default_rng(seed)
    cells = cell_indices(N, D)
    resamples = [cell_resample(cells, rng) for _ in range(bootstrap)]  # drawn here: repeatable under a seed
    thetas, status = [], {"converged": 0, "near_bound": 0, "not_converged": 0}
    for res in (_best_of(basins, logN, logD, logL, idx) for idx in resamples):  # every resample kept
        thetas.append(res.x)
        key = "not_converged" if not _converged(res) else "near_bound" if near_bounds(res.x) else "converged"
        status[key] += 1
    thetas = np.array(thetas).reshape(-1, 5)
    samples = [asdict(_law(t)) for t in thetas]

    problems = []
    if not _converged(best):
        problems.append(f"the optimizer stopped without converging ({best.message})")
    if near_bounds(best.x):
        problems.append(f"{', '.join(near_bounds(best.x))} ended at its search bound")
    wide = []
    if bootstrap:
        for i, (name, (lo, hi)) in enumerate(zip(THETA_NAMES, BOUNDS)):
            a, b = interval(thetas[:, i], level=0.95)
            if b - a > WIDE_INTERVAL * (hi - lo):
                wide.append(name)
    if wide:
        problems.append(f"the 95% interval of {', '.join(wide)} spans most of the search box")
    flagged = (status["near_bound"] + status["not_converged"]) / bootstrap if bootstrap else 0.0
    result = {
        "approach": 3,
        **asdict(law),
        "converged": not problems,
        "message": "; ".join(problems) + (": the data do not determine the law" if problems else "")
        or "converged, every parameter inside its search box",
        "max_gradient": float(np.abs(best.jac).max()),
        "objective": float(best.fun),
        "runs": len(N),
        "starts": len(grid),
        "basins": len(basins),
        "residuals": (np.log(law.loss(N, D)) - logL).tolist(),
        "bootstrap": bootstrap,
        "bootstrap_status": status,
        "bootstrap_flagged_share": flagged,
        "level": level,
        "interval": {k: interval([s[k] for s in samples], level) for k in LAW_PARAMS} if bootstrap else {},
        "_samples": samples,
    }
    if problems:
        warnings.warn(f"approach 3 did not converge: {result['message']}", stacklevel=2)
    if flagged > FLAGGED_SHARE:
        warnings.warn(
            f"{flagged:.0%} of the bootstrap refits ended near a bound or did not converge "
            f"({status['near_bound']} near a bound, {status['not_converged']} not converged, all kept)",
            stacklevel=2,
        )
    return result


def with_interval(fit3: dict, key: str) -> str:
    """'0.34 [0.31, 0.37]': a fitted value and its bootstrap interval, for reports."""
    ci = fit3.get("interval", {})
    return f"{fit3[key]:.4g}" + (f" [{ci[key][0]:.3g}, {ci[key][1]:.3g}]" if key in ci else "")


def format_interval(bounds) -> str:
    """'[0.31, 0.37]', or 'n/a' where no bootstrap gave one."""
    return "[{:.3g}, {:.3g}]".format(*bounds) if bounds else "n/a"
