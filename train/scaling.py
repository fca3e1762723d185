"""Fit scaling laws to any CSV of runs, and measure compute multipliers between recipes.

    python -m train.scaling fit RUNS.csv --out DIR [--loss loss --loss val_caption ...] [--recipe-col recipe]
                                         [--bootstrap 1000] [--seed 0] [--target-flops 1e18]

Columns: `params` (N), `tokens` (D), one or more loss columns; optionally `flops` (else 6ND), and a recipe
column. Writes DIR/fit.json (every number) and PNG plots.

Approach 3 (Hoffmann et al. 2022): L(N, D) = E + A/N^alpha + B/D^beta, fitted as Chinchilla did: Huber loss
(delta 1e-3) between log L and LSE(a - alpha log N, b - beta log D, e), L-BFGS from their grid of starts
(screened by objective value: the 50 best of the 4500 are run; `full_grid=True` runs all), with tolerances tight
enough that it does not stop early (Besiroglu et al. 2024 showed the default ones stop at the wrong answer); 95%
intervals from a seeded bootstrap over runs. Approach 2: one parabola in log N per FLOP
budget; a budget whose minimum lies at the edge of its size grid is rejected (and reported); power laws through
the minima. Derived: compute-optimal N*(C), D*(C) and tokens per parameter (C = 6ND), a held-out check (fit
without the largest budget, predict it), and the compute multiplier of each recipe against the first: how many
times less compute it needs to reach the baseline's compute-optimal loss at the target compute.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import brentq, minimize
from scipy.special import logsumexp, softmax

HUBER_DELTA = 1e-3
LAW_PARAMS = ("E", "A", "B", "alpha", "beta")
GRID = {  # Chinchilla's grid of initialisations
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
LBFGS = {"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 50}
# Generous bounds (a, b, e, alpha, beta): a real fit never touches them, but on data that cannot determine the
# law the search would otherwise run off to exp(1000). A parameter that ends on a bound is reported, not trusted.
BOUNDS = [(-50.0, 50.0), (-50.0, 50.0), (-10.0, 10.0), (0.0, 5.0), (0.0, 5.0)]


class FitError(ValueError):
    """Data that cannot support the fit asked for; the message says what is missing."""


# --------------------------------------------------------------------------------------------------- data
def read_runs(path: str | Path, loss_cols: list[str], recipe_col: str | None = None) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise FitError(f"{path} has no rows")
    needed = ["params", "tokens", *loss_cols] + ([recipe_col] if recipe_col else [])
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise FitError(f"{path} lacks the column(s) {missing}; it has {list(rows[0])}")
    out: dict[str, np.ndarray] = {}
    for col in ["params", "tokens", *loss_cols] + (["flops"] if "flops" in rows[0] else []):
        try:
            values = np.array([float(r[col]) for r in rows])
        except ValueError as e:
            raise FitError(f"column '{col}' holds a value that is not a number: {e}") from e
        bad = np.flatnonzero(~(values > 0) | ~np.isfinite(values))
        if len(bad):
            raise FitError(f"column '{col}' must be positive and finite; row {int(bad[0]) + 2} holds {values[bad[0]]}")
        out[col] = values
    if "flops" not in out:
        out["flops"] = 6 * out["params"] * out["tokens"]
    if recipe_col:
        out["recipe"] = np.array([r[recipe_col] for r in rows])
    return out


def budgets(flops: np.ndarray, rel_tol: float = 0.05) -> np.ndarray:
    """Group runs into FLOP budgets: values within rel_tol of each other share one (their geometric mean)."""
    order = np.argsort(flops)
    labels = np.empty(len(flops))
    group = [order[0]]
    for i in order[1:]:
        if flops[i] <= flops[group[0]] * (1 + rel_tol):
            group.append(i)
        else:
            labels[group] = np.exp(np.mean(np.log(flops[group])))
            group = [i]
    labels[group] = np.exp(np.mean(np.log(flops[group])))
    return labels


# ---------------------------------------------------------------------------------------------- approach 3
@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_fit(cls, fit: dict) -> Law:
        """The law in a fit's result dict (approach 3), ignoring its other entries."""
        return cls(**{k: fit[k] for k in LAW_PARAMS})

    def loss(self, N, D):
        with np.errstate(over="ignore"):
            return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def optimal(self, C):
        """Compute-optimal (N*, D*) for C = 6ND."""
        a = self.beta / (self.alpha + self.beta)
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        N = G * np.power(np.asarray(C) / 6, a)
        return N, np.asarray(C) / (6 * N)

    def frontier(self, C):
        N, D = self.optimal(C)
        return self.loss(N, D)


def _objective(theta, logN, logD, logL):
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    pred = logsumexp(terms, axis=0)
    r = pred - logL
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    w = softmax(terms, axis=0) * dr
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * logN).sum(), -(w[1] * logD).sum()])
    return loss, grad


def _fit_from(starts, logN, logD, logL):
    best = None
    for theta0 in starts:
        res = minimize(
            _objective, theta0, args=(logN, logD, logL), jac=True, method="L-BFGS-B", bounds=BOUNDS, options=LBFGS
        )
        if best is None or res.fun < best.fun:
            best = res
    return best


def _law(theta) -> Law:
    a, b, e, alpha, beta = theta
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _screen(grid: np.ndarray, logN, logD, logL, keep: int) -> np.ndarray:
    """The `keep` grid starts with the lowest objective, evaluated for the whole grid in one vectorised pass."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(grid), len(logN)))])
    r = np.abs(logsumexp(terms, axis=0) - logL)
    huber = np.where(r <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(axis=1)
    return grid[np.argsort(huber)[:keep]]


def fit_approach3(N, D, L, bootstrap: int = 1000, seed: int = 0, full_grid: bool = False, starts: int = 50) -> dict:
    if len(set(N)) < 3 or len(set(D)) < 3 or len(N) < 6:
        raise FitError(
            f"approach 3 needs at least 6 runs over at least 3 distinct sizes and 3 distinct token counts; "
            f"got {len(N)} runs, {len(set(N))} sizes, {len(set(D))} token counts"
        )
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    grid = np.array([(a, b, e, al, be) for al, be, e, a, b in itertools.product(*GRID.values())])
    if not full_grid:  # L-BFGS from the best `starts` of the 4500 (same optimum in tests/test_scaling.py, 90x faster)
        grid = _screen(grid, logN, logD, logL, starts)
    best = _fit_from(grid, logN, logD, logL)
    law = _law(best.x)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):  # resample runs; start from the full fit (a full grid per resample is 4500x slower)
        idx = rng.integers(0, len(N), len(N))
        if len(set(N[idx])) < 2 or len(set(D[idx])) < 2:
            continue
        res = _fit_from([best.x], logN[idx], logD[idx], logL[idx])
        samples.append(asdict(_law(res.x)))
    # With tolerances at float precision L-BFGS-B often ends in an "abnormal" line search at the optimum itself:
    # call it converged when the gradient vanishes there.
    converged = bool(best.success) or float(np.abs(best.jac).max()) < 1e-7
    names = ("a = log A", "b = log B", "e = log E", "alpha", "beta")
    at_bound = [n for n, v, (lo, hi) in zip(names, best.x, BOUNDS) if min(v - lo, hi - v) < 1e-6]
    if at_bound:
        converged = False
        best.message = f"{', '.join(at_bound)} ended on its search bound: the data do not determine the law"
    result = {
        "approach": 3,
        **asdict(law),
        "converged": converged,
        "max_gradient": float(np.abs(best.jac).max()),
        "message": str(best.message),
        "objective": float(best.fun),
        "runs": len(N),
        "residuals": (np.log(law.loss(N, D)) - logL).tolist(),
        "bootstrap": len(samples),
    }
    if not converged:
        warnings.warn(f"approach 3 did not converge: {best.message}", stacklevel=2)
    result["interval"] = {k: _ci([s[k] for s in samples]) for k in LAW_PARAMS} if samples else {}
    result["_samples"] = samples
    return result


def with_interval(fit3: dict, key: str) -> str:
    """'0.34 [0.31, 0.37]': a fitted value and its bootstrap interval, for reports."""
    ci = fit3.get("interval", {})
    return f"{fit3[key]:.4g}" + (f" [{ci[key][0]:.3g}, {ci[key][1]:.3g}]" if key in ci else "")


def format_interval(interval) -> str:
    """'[0.31, 0.37]', or 'n/a' where no bootstrap sample gave one."""
    return "[{:.3g}, {:.3g}]".format(*interval) if interval else "n/a"


def _ci(values) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


# ---------------------------------------------------------------------------------------------- approach 2
def fit_approach2(N, D, L, flops, min_sizes: int = 3) -> dict:
    labels = budgets(flops)
    minima, rejected = [], []
    curves = {}
    for C in sorted(set(labels)):
        sel = labels == C
        n, loss = N[sel], L[sel]
        if len(set(n)) < min_sizes:
            rejected.append({"flops": C, "reason": f"{len(set(n))} sizes (needs {min_sizes})"})
            continue
        x = np.log(n)
        c2, c1, c0 = np.polyfit(x, loss, 2)
        curves[C] = (c2, c1, c0, x.min(), x.max())
        if c2 <= 0:
            rejected.append({"flops": C, "reason": "the parabola opens downward: no minimum"})
            continue
        x_star = -c1 / (2 * c2)
        if np.argmin(loss) in (np.argmin(x), np.argmax(x)) or not x.min() < x_star < x.max():
            rejected.append({"flops": C, "reason": "the minimum is at the edge of the size grid: extend the grid"})
            continue
        N_star = math.exp(x_star)
        minima.append({"flops": C, "N": N_star, "D": C / (6 * N_star), "loss": c0 + c1 * x_star + c2 * x_star**2})
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
    logC = np.log([m["flops"] for m in minima])
    a, logk = np.polyfit(logC, np.log([m["N"] for m in minima]), 1)
    b, logkd = np.polyfit(logC, np.log([m["D"] for m in minima]), 1)
    result.update({"N_exponent": a, "N_coefficient": math.exp(logk), "D_exponent": b, "D_coefficient": math.exp(logkd)})
    return result


# ------------------------------------------------------------------------------------------------- derived
def derived(fit3: dict, targets: list[float]) -> dict:
    out = {}
    samples = [Law(**s) for s in fit3.get("_samples", []) if min(s["alpha"], s["beta"]) > 1e-6]
    law = Law.from_fit(fit3)
    for C in targets:
        N, D = law.optimal(C)
        row = {"N": float(N), "D": float(D), "tokens_per_param": float(D / N), "loss": float(law.frontier(C))}
        if samples:
            Ns = [float(s.optimal(C)[0]) for s in samples]
            Ds = [float(s.optimal(C)[1]) for s in samples]
            row.update(N_interval=_ci(Ns), D_interval=_ci(Ds), tokens_per_param_interval=_ci(np.array(Ds) / Ns))
        out[f"{C:.3g}"] = row
    a = law.beta / (law.alpha + law.beta)
    out["N_exponent"], out["D_exponent"] = a, 1 - a
    return out


def held_out(N, D, L, flops) -> dict:
    """Fit approach 3 without the largest budget; the error predicting that budget's runs."""
    labels = budgets(flops)
    top = labels == labels.max()
    fit = fit_approach3(N[~top], D[~top], L[~top], bootstrap=0)
    pred = Law.from_fit(fit).loss(N[top], D[top])
    err = pred - L[top]
    return {
        "budget": float(labels.max()),
        "runs": int(top.sum()),
        "mean_abs_error": float(np.abs(err).mean()),
        "mean_rel_error": float(np.abs(err / L[top]).mean()),
    }


def compute_multiplier(base: dict, other: dict, C: float) -> dict:
    """How many times less compute `other` needs to reach `base`'s compute-optimal loss at compute C."""

    def one(lb: Law, lo: Law) -> float:
        target = lb.frontier(C)
        if target <= lo.E:
            return float("nan")  # the other recipe never reaches this loss
        f = lambda logc: lo.frontier(math.exp(logc)) - target  # noqa: E731
        lo_c, hi_c = math.log(C) - 40, math.log(C) + 40
        return C / math.exp(brentq(f, lo_c, hi_c)) if f(lo_c) > 0 > f(hi_c) else float("nan")

    value = one(Law.from_fit(base), Law.from_fit(other))
    pairs = [one(Law(**b), Law(**o)) for b, o in zip(base.get("_samples", []), other.get("_samples", []))]
    pairs = [p for p in pairs if math.isfinite(p)]
    return {"target_flops": C, "multiplier": value, "interval": _ci(pairs) if pairs else None, "bootstrap": len(pairs)}


# --------------------------------------------------------------------------------------------------- plots
def _plots(out: Path, col: str, data: dict, fits: dict, recipes: list) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig_iso, ax_iso = plt.subplots(figsize=(6, 4.5))
    fig_fr, ax_fr = plt.subplots(figsize=(6, 4.5))
    fig_res, ax_res = plt.subplots(figsize=(6, 3.5))
    for ri, recipe in enumerate(recipes):
        sel = np.ones(len(data["params"]), bool) if recipe is None else data["recipe"] == recipe
        N, L, F = data["params"][sel], data[col][sel], data["flops"][sel]
        name = recipe or "runs"
        fit2, fit3 = fits[name]["approach2"], fits[name]["approach3"]
        labels = budgets(F)
        for bi, C in enumerate(sorted(set(labels))):
            s = labels == C
            marker = "os^vD"[ri % 5]
            ax_iso.scatter(N[s], L[s], color=colors[bi % len(colors)], marker=marker, s=18)
            curve = fit2["curves"].get(str(C))
            if curve:
                c2, c1, c0, lo, hi = curve
                x = np.linspace(lo, hi, 50)
                ax_iso.plot(
                    np.exp(x),
                    c0 + c1 * x + c2 * x**2,
                    color=colors[bi % len(colors)],
                    lw=1,
                    ls="-" if ri == 0 else "--",
                    label=f"{name} C={C:.2g}",
                )
        for m in fit2["minima"]:
            ax_iso.scatter([m["N"]], [m["loss"]], color="k", marker="x", s=40, zorder=3)
        ax_fr.scatter(F, L, s=14, color=colors[ri % len(colors)], alpha=0.7, label=f"{name} runs")
        if "E" in fit3:
            law = Law.from_fit(fit3)
            grid = np.geomspace(F.min() / 3, F.max() * 30, 100)
            ax_fr.plot(
                grid,
                law.frontier(grid),
                color=colors[ri % len(colors)],
                label=f"{name} frontier: alpha={law.alpha:.2f} beta={law.beta:.2f}",
            )
            ax_res.scatter(F, fit3["residuals"], s=14, color=colors[ri % len(colors)], label=name)
    for ax, title, xl in (
        (ax_iso, f"IsoFLOP curves ({col})", "parameters N"),
        (ax_fr, f"loss vs compute, fitted frontier ({col})", "training FLOPs"),
        (ax_res, "approach-3 residuals (log predicted - log observed)", "training FLOPs"),
    ):
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xl)
        ax.legend(fontsize=6)
    ax_res.axhline(0, color="k", lw=0.5)
    for fig, stem in (
        (fig_iso, "isoflop"),
        (fig_fr, "frontier" if len(recipes) == 1 else "recipes"),
        (fig_res, "residuals"),
    ):
        path = out / f"{stem}_{col}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


# ----------------------------------------------------------------------------------------------------- CLI
def fit_csv(path, out, loss_cols=("loss",), recipe_col=None, bootstrap=1000, seed=0, target_flops=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = read_runs(path, list(loss_cols), recipe_col)
    recipes = list(dict.fromkeys(data["recipe"].tolist())) if recipe_col else [None]
    target = float(target_flops or data["flops"].max())
    report: dict = {
        "csv": str(path),
        "runs": len(data["params"]),
        "target_flops": target,
        "losses": {},
        "plots": [],
        "warnings": [],
    }
    for col in loss_cols:
        with np.errstate(all="ignore"):  # degenerate bootstrap samples divide by zero; they are dropped, not fatal
            report["losses"][col] = _fit_column(data, col, recipes, target, bootstrap, seed, out, report)
    (out / "fit.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def _fit_column(data, col, recipes, target, bootstrap, seed, out, report) -> dict:
    """Both approaches, derived quantities and multipliers for one loss column; warnings go into the report."""
    fits = {}
    for recipe in recipes:
        sel = np.ones(len(data["params"]), bool) if recipe is None else data["recipe"] == recipe
        N, D, L, F = data["params"][sel], data["tokens"][sel], data[col][sel], data["flops"][sel]
        entry: dict = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                entry["approach3"] = fit_approach3(N, D, L, bootstrap, seed)
                entry["compute_optimal"] = derived(entry["approach3"], sorted(set(budgets(F))) + [target])
            except FitError as e:
                entry["approach3"] = {"error": str(e)}
            entry["approach2"] = fit_approach2(N, D, L, F)
            try:
                entry["held_out"] = held_out(N, D, L, F)
            except FitError as e:
                entry["held_out"] = {"error": str(e)}
        for w in caught:  # numpy's own runtime warnings are silenced above; these are the fitter's
            message = f"{col}/{recipe or 'runs'}: {w.message}"
            if message not in report["warnings"]:
                report["warnings"].append(message)
        for r in entry["approach2"]["rejected"]:
            report["warnings"].append(f"{col}/{recipe or 'runs'}: budget {r['flops']:.3g} rejected: {r['reason']}")
        for part in ("approach3", "approach2", "held_out"):
            if "error" in entry[part]:
                report["warnings"].append(f"{col}/{recipe or 'runs'} {part}: {entry[part]['error']}")
        fits[recipe or "runs"] = entry
    if len(recipes) > 1:
        base = fits[recipes[0]]["approach3"]
        for recipe in recipes[1:]:
            other = fits[recipe]["approach3"]
            if "E" in base and "E" in other:
                fits[recipe]["compute_multiplier_vs_" + recipes[0]] = compute_multiplier(base, other, target)
    report["plots"] += _plots(out, col, data, fits, recipes)
    for entry in fits.values():
        entry["approach3"].pop("_samples", None)
    return fits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit approaches 2 and 3 to a CSV of runs")
    f.add_argument("csv")
    f.add_argument("--out", required=True)
    f.add_argument("--loss", action="append", help="loss column(s) to fit, each separately (default: loss)")
    f.add_argument("--recipe-col", help="column naming the recipe; multipliers are against the first recipe")
    f.add_argument("--bootstrap", type=int, default=1000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--target-flops", type=float, help="compute for the optimal-allocation table and multipliers")
    args = ap.parse_args(argv)
    try:
        report = fit_csv(
            args.csv, args.out, args.loss or ["loss"], args.recipe_col, args.bootstrap, args.seed, args.target_flops
        )
    except FitError as e:
        raise SystemExit(f"error: {e}") from e
    summarize(report)


def summarize(report: dict) -> None:
    for col, fits in report["losses"].items():
        for name, entry in fits.items():
            f3 = entry["approach3"]
            if "E" in f3:
                values = " ".join(f"{k}={with_interval(f3, k)}" for k in LAW_PARAMS)
                print(f"{col} / {name}: L = E + A/N^alpha + B/D^beta with {values} (converged: {f3['converged']})")
                top = entry["compute_optimal"][f"{report['target_flops']:.3g}"]
                print(
                    f"   at C={report['target_flops']:.3g}: N*={top['N']:.3g} D*={top['D']:.3g} "
                    f"tokens/param={top['tokens_per_param']:.3g}"
                )
            for key, value in entry.items():
                if key.startswith("compute_multiplier"):
                    print(f"   {key}: {value['multiplier']:.3g}x (95% interval {format_interval(value['interval'])})")
    for w in report["warnings"]:
        print(f"warning: {w}")


if __name__ == "__main__":
    main()
