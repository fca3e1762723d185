"""The fitter's figures: IsoFLOP curves with their parabolas, loss against compute with the fitted frontiers, and
approach 3's residuals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaling.law import Law
from scaling.runs import budgets


def plot_column(out: Path, col: str, data: dict, fits: dict, recipes: list) -> list[str]:
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
            ax_iso.scatter(N[s], L[s], color=colors[bi % len(colors)], marker="os^vD"[ri % 5], s=18)
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
                law.frontier(grid, data["cost"]),
                color=colors[ri % len(colors)],
                ls="-" if fit3["converged"] else ":",
                label=f"{name} frontier: alpha={law.alpha:.2f} beta={law.beta:.2f}"
                + ("" if fit3["converged"] else " (not converged)"),
            )
            ax_res.scatter(F, fit3["residuals"], s=14, color=colors[ri % len(colors)], label=name)
    flops_name = data["conventions"]["flops"]["column"]
    for ax, title, xl in (
        (ax_iso, f"IsoFLOP curves ({col})", "parameters N"),
        (ax_fr, f"loss vs compute, fitted frontier ({col})", f"training FLOPs ({flops_name})"),
        (ax_res, "approach-3 residuals (log predicted - log observed)", f"training FLOPs ({flops_name})"),
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
