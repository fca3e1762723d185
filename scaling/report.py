"""Fit a CSV of runs: both approaches per recipe and loss column, compute-optimal allocations, a held-out check,
multipliers between recipes; `fit.json` (every number), the plots, a printed summary and `report.md`.

    python -m scaling fit RUNS.csv --out DIR [--loss loss ...] [--recipe-col recipe] [--params-col params]
                                   [--flops 6n+attn] [--bootstrap 1000] [--seed 0] [--target-flops 1e18]
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from scaling.conventions import CostModel
from scaling.fit import FLAGGED_SHARE, fit_approach3, format_interval, interval, with_interval
from scaling.isoflop import fit_approach2
from scaling.law import LAW_PARAMS, Law
from scaling.multiplier import compute_multiplier, describe
from scaling.paired import describe_paired, paired_difference
from scaling.runs import FitError, budgets, read_runs

EXTRAPOLATE = 10.0  # multipliers are also given at this many times the target compute


def derived(fit3: dict, targets: list[float], cost: CostModel) -> dict:
    """N*(C), D*(C), tokens per parameter and the frontier's loss at each target, with intervals over every
    bootstrap resample."""
    out = {}
    law = Law.from_fit(fit3)
    samples = [Law(**s) for s in fit3.get("_samples", [])]
    level = fit3.get("level", 0.95)
    for C in targets:
        N, D = law.optimal(C, cost)
        row = {"N": float(N), "D": float(D), "tokens_per_param": float(D / N), "loss": float(law.frontier(C, cost))}
        if samples:
            with np.errstate(all="ignore"):
                Ns, Ds = np.array([s.optimal(C, cost) for s in samples], dtype=float).T
                tpp = np.nan_to_num(Ds / Ns, nan=np.inf)
            row.update(
                N_interval=interval(np.nan_to_num(Ns, nan=np.inf), level),
                D_interval=interval(np.nan_to_num(Ds, nan=np.inf), level),
                tokens_per_param_interval=interval(tpp, level),
            )
        out[f"{C:.3g}"] = row
    s = law.alpha + cost.p * law.beta
    out["N_exponent"], out["D_exponent"] = law.beta / s, 1 - cost.p * law.beta / s
    return out


def held_out(N, D, L, flops) -> dict:
    """Fit approach 3 without the largest budget; the error predicting that budget's runs."""
    labels = budgets(flops)
    top = labels == labels.max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_approach3(N[~top], D[~top], L[~top], bootstrap=0)
    err = Law.from_fit(fit).loss(N[top], D[top]) - L[top]
    return {
        "budget": float(labels.max()),
        "runs": int(top.sum()),
        "converged": fit["converged"],
        "mean_abs_error": float(np.abs(err).mean()),
        "mean_rel_error": float(np.abs(err / L[top]).mean()),
    }


def fit_csv(
    path,
    out,
    loss_cols=("loss",),
    recipe_col=None,
    bootstrap=1000,
    seed=0,
    target_flops=None,
    params_col="params",
    flops=None,
    level=0.95,
    baseline=None,
) -> dict:
    """baseline: the recipe every other is compared with (compute multipliers, cell-by-cell differences); default
    the first in the CSV, which is the order cells finished in."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = read_runs(path, list(loss_cols), recipe_col, params_col, flops)
    recipes = list(dict.fromkeys(data["recipe"].tolist())) if recipe_col else [None]
    if baseline is not None:
        if baseline not in recipes:
            raise FitError(f"baseline recipe '{baseline}' is not in {path}'s recipes: {recipes}")
        recipes.remove(baseline)
        recipes.insert(0, baseline)
    target = float(target_flops or data["flops"].max())
    report: dict = {
        "csv": str(path) if isinstance(path, str | Path) else [str(p) for p in path],
        "runs": len(data["params"]),
        "conventions": data["conventions"],
        "target_flops": target,
        "extrapolated_flops": target * EXTRAPOLATE,
        "level": level,
        "losses": {},
        "plots": [],
        "warnings": [],
    }
    for col in loss_cols:
        with np.errstate(all="ignore"):
            report["losses"][col] = _fit_column(data, col, recipes, report, bootstrap, seed, out, level)
    (out / "fit.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def _fit_column(data, col, recipes, report, bootstrap, seed, out, level) -> dict:
    """Both approaches, derived quantities and multipliers for one loss column; warnings go into the report."""
    from scaling.plots import plot_column

    cost: CostModel = data["cost"]
    target = report["target_flops"]
    fits = {}
    for recipe in recipes:
        sel = np.ones(len(data["params"]), bool) if recipe is None else data["recipe"] == recipe
        N, D, L, F = data["params"][sel], data["tokens"][sel], data[col][sel], data["flops"][sel]
        entry: dict = {}
        name = recipe or "runs"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                entry["approach3"] = fit_approach3(N, D, L, bootstrap, seed, level=level)
                grid = sorted(set(budgets(F))) + [target, target * EXTRAPOLATE]
                entry["compute_optimal"] = derived(entry["approach3"], grid, cost)
            except FitError as e:
                entry["approach3"] = {"error": str(e)}
            entry["approach2"] = fit_approach2(N, D, L, F, cost, bootstrap, seed, target, level)
            try:
                entry["held_out"] = held_out(N, D, L, F)
            except FitError as e:
                entry["held_out"] = {"error": str(e)}
        for w in caught:  # numpy's own runtime warnings are silenced above; these are the fitter's
            message = f"{col}/{name}: {w.message}"
            if message not in report["warnings"]:
                report["warnings"].append(message)
        for r in entry["approach2"]["rejected"]:
            report["warnings"].append(f"{col}/{name}: budget {r['flops']:.3g} rejected: {r['reason']}")
        for part in ("approach3", "approach2", "held_out"):
            if "error" in entry[part]:
                report["warnings"].append(f"{col}/{name} {part}: {entry[part]['error']}")
        fits[name] = entry
    if len(recipes) > 1:
        base = fits[recipes[0]]["approach3"]
        for recipe in recipes[1:]:
            other = fits[recipe]["approach3"]
            if "E" in base and "E" in other:
                fits[recipe]["compute_multiplier_vs_" + recipes[0]] = [
                    compute_multiplier(base, other, C, cost, level) for C in (target, target * EXTRAPOLATE)
                ]
            paired = paired_difference(data, col, recipes[0], recipe, bootstrap, seed, level)
            if paired:
                fits[recipe]["paired_vs_" + recipes[0]] = paired
    report["plots"] += plot_column(out, col, data, fits, recipes)
    for entry in fits.values():
        entry["approach3"].pop("_samples", None)
    return fits


def _conventions_line(report: dict) -> str:
    c = report["conventions"]
    cost = c["flops"]["cost_model"]
    return (
        f"N: column `{c['params']['column']}` ({c['params']['meaning']}). C: column `{c['flops']['column']}` "
        f"({c['flops']['meaning']}); cost model C = {cost['k']:.4g} N^{cost['p']:.4f} D "
        f"(within {cost['max_rel_error']:.1%} of every run's FLOPs per token)."
    )


def summarize(report: dict) -> None:
    print(_conventions_line(report))
    for col, fits in report["losses"].items():
        for name, entry in fits.items():
            f3, f2 = entry["approach3"], entry["approach2"]
            if "E" in f3:
                values = " ".join(f"{k}={with_interval(f3, k)}" for k in LAW_PARAMS)
                verdict = "converged" if f3["converged"] else f"NOT CONVERGED: {f3['message']}"
                print(f"{col} / {name}: L = E + A/N^alpha + B/D^beta with {values} ({verdict})")
                top = entry["compute_optimal"][f"{report['target_flops']:.3g}"]
                print(
                    f"   at C={report['target_flops']:.3g}: N*={top['N']:.3g} D*={top['D']:.3g} "
                    f"tokens/param={top['tokens_per_param']:.3g}"
                )
            if "N_exponent" in f2:
                ci = f2.get("interval", {}).get("N_exponent")
                print(f"   approach 2: N* ~ C^{f2['N_exponent']:.3f} {format_interval(ci)}")
            for key, values in entry.items():
                if key.startswith("compute_multiplier"):
                    for m in values:
                        print(f"   {key} at C={m['target_flops']:.3g}: {describe(m)}")
                if key.startswith("paired_vs_"):
                    print(f"   {col} cell by cell: {describe_paired(values, key.split('_vs_')[1])}")
    for w in report["warnings"]:
        print(f"warning: {w}")


def write_markdown(report: dict, path: Path, title: str) -> Path:
    pct = f"{report['level']:.0%}"
    lines = [f"# {title}", "", f"{report['runs']} runs from `{report['csv']}`; every number in `fit.json`.", ""]
    lines += [_conventions_line(report), ""]
    for col, fits in report["losses"].items():
        lines += [
            f"## {col}",
            "",
            f"Approach 3 ({pct} bootstrap intervals):",
            "",
            "| recipe | E | A | B | alpha | beta | converged | flagged refits | held-out error |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, e in fits.items():
            f3, ho = e["approach3"], e.get("held_out", {})
            if "E" not in f3:
                lines.append(f"| {name} | {f3['error']} |")
                continue
            err = f"{ho['mean_rel_error']:.1%}" if "mean_rel_error" in ho else ho.get("error", "")
            values = " | ".join(with_interval(f3, k) for k in LAW_PARAMS)
            verdict = "yes" if f3["converged"] else f"**no**: {f3['message']}"
            flagged = f"{f3['bootstrap_flagged_share']:.0%}" + (
                " (over the limit)" if f3["bootstrap_flagged_share"] > FLAGGED_SHARE else ""
            )
            lines.append(f"| {name} | {values} | {verdict} | {flagged} | {err} |")
        lines += ["", "Approach 2 (a parabola per budget):", ""]
        for name, e in fits.items():
            f2 = e["approach2"]
            if "N_exponent" in f2:
                ci = f2.get("interval", {})
                lines.append(
                    f"- {name}: N* ~ C^{f2['N_exponent']:.3f} {format_interval(ci.get('N_exponent'))}, "
                    f"D* ~ C^{f2['D_exponent']:.3f} {format_interval(ci.get('D_exponent'))} from "
                    f"{len(f2['minima'])} budgets ({len(f2['rejected'])} rejected)"
                )
            else:
                lines.append(f"- {name}: {f2.get('error')}")
        for name, e in fits.items():
            for key, values in e.items():
                if key.startswith("compute_multiplier"):
                    base = key.split("_vs_")[1]
                    lines.append("")
                    for m in values:
                        note = "" if m["from_converged_fits"] else " **Do not quote.**"
                        v = m["multiplier"]
                        what = (
                            f"**{v:.3g}x** less compute than {base}"
                            if math.isfinite(v) and v > 0
                            else f"no multiplier against {base}"
                        )
                        lines.append(f"- {name}: {what} at {m['target_flops']:.3g} FLOPs: {describe(m)}.{note}")
                if key.startswith("paired_vs_"):
                    base = key.split("_vs_")[1]
                    lines += ["", f"- {name}, cell by cell (no law): {col} {describe_paired(values, base)}."]
        lines += [""] + [f"![{p}]({p})" for p in report["plots"] if p.endswith(f"_{col}.png")] + [""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    path.write_text("\n".join(lines) + "\n")
    return path
