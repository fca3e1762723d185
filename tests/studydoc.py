"""What the study tests read from a STUDY.md and a results CSV: the prose as read (whatever its line breaks) and
the rows of its tables, so a test can hold each figure against what the data give."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest


def flat(doc: Path) -> str:
    return " ".join(doc.read_text().split())


def table_rows(doc: Path, first: set[str], width: int) -> dict:
    """{(first cell, second cell): the other cells} of every table row `width` cells wide whose first is in `first`."""
    rows = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == width and cells[0] in first:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def row(doc: Path, label: str) -> list[str]:
    """The cells after `label` of the table row that starts with it."""
    line = next(line for line in doc.read_text().splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")][1:]


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def committed_fit(run: Path) -> dict:
    """The committed fit of a run: `fit.json`'s losses, per column and recipe."""
    return json.loads((run / "fit" / "fit.json").read_text())["losses"]


def refit(run: Path, out: Path, columns) -> dict:
    """The run's CSV fitted again by the repo's fitter. Point estimates do not depend on the number of resamples
    (a committed fit's came with 300; 10 here)."""
    from scaling.report import fit_csv

    return fit_csv(run / "results.csv", out, columns, "recipe", bootstrap=10, seed=0, flops="6n+attn")["losses"]


def refit_csvs(paths, out: Path, columns) -> dict:
    """Several runs' CSVs fitted again as one set (point estimates, 10 resamples)."""
    from scaling.report import fit_csv

    return fit_csv(list(paths), out, columns, "recipe", bootstrap=10, seed=0, flops="6n+attn")["losses"]


def check_law_cells(table: dict, committed: dict, refitted: dict) -> None:
    """Each row's E, A, B, alpha, beta cells are the committed fit's point and 95% interval, and, for a column fitted
    again, the refit's point."""
    for (col, recipe), cells in table.items():
        f3 = committed[col][recipe]["approach3"]
        for name, cell in zip(("E", "A", "B", "alpha", "beta"), cells[:5], strict=True):
            point, interval = cell.split(" [")
            lo, hi = f3["interval"][name]
            assert interval == f"{lo:.3g}, {hi:.3g}]", (col, recipe, name)
            assert f3[name] == pytest.approx(float(point), rel=6e-4), (col, recipe, name)
            if col in refitted:  # the committed fit is this CSV's: the fitter gives its point estimates again
                assert refitted[col][recipe]["approach3"][name] == pytest.approx(float(point), rel=6e-4)


def check_approach_two(table: dict, committed: dict, refitted: dict) -> None:
    """Rows of approach 3's N* exponent next to approach 2's, its interval, budgets kept and fallback share."""
    for (col, recipe), cells in table.items():
        fit = committed[col][recipe]
        a2 = fit["approach2"]
        lo, hi = a2["interval"]["N_exponent"]
        assert cells[0] == f"{fit['compute_optimal']['N_exponent']:.3f}"
        assert cells[1] == f"{a2['N_exponent']:.3f} [{lo:.3f}, {hi:.3f}]"
        assert refitted[col][recipe]["approach2"]["N_exponent"] == pytest.approx(a2["N_exponent"], rel=1e-6)
        assert cells[2] == f"{a2['budgets'] - len(a2['rejected'])} of {a2['budgets']}"
        assert cells[3] == f"{100 * a2['bootstrap_fallback_share']:.0f}%"


def optimal_cells(committed: dict, recipe: str, budget: str) -> tuple[str, str]:
    """N* and tokens per parameter at a budget ("3e15"), with intervals, as the study tables print them."""
    v = committed["loss"][recipe]["compute_optimal"][budget.replace("e", "e+")]
    n = f"{v['N']:.2e} [{v['N_interval'][0]:.2e}, {v['N_interval'][1]:.2e}]".replace("e+0", "e")
    lo, hi = v["tokens_per_param_interval"]
    return n, f"{v['tokens_per_param']:.0f} [{lo:.0f}, {hi:.0f}]"


def util_medians(run: Path) -> tuple[float, float, int]:
    """The GPU's busy share and the host's load average, medians over the 5 s samples taken while cells held the
    GPU's memory (util.log), and how many samples those are."""
    samples = [line.split() for line in (run / "util.log").read_text().splitlines()]
    running = [(int(r[1]), float(r[5])) for r in samples if len(r) >= 6 and r[2] == "%," and int(r[3]) > 0]
    return statistics.median(b for b, _ in running), statistics.median(x for _, x in running), len(running)


def check_law_flags(table: dict, committed: dict) -> None:
    """Each law row's converged, flagged-refits and held-out-error cells are the committed fit's."""
    for (col, recipe), cells in table.items():
        fit = committed[col][recipe]
        f3 = fit["approach3"]
        which = f3["message"].split(":")[0].removeprefix("the 95% interval of ")
        assert cells[5] == ("yes" if f3["converged"] else f"**no** ({which})"), (col, recipe)
        assert cells[6] == f"{100 * f3['bootstrap_flagged_share']:.0f}%"
        assert cells[7] == f"{100 * fit['held_out']['mean_rel_error']:.1f}%"


def pooled_cells(x: dict) -> list[str]:
    """A pooled fit's row as the study tables print it: E, alpha, beta with intervals, converged, held-out error,
    N* and tokens per parameter at 3.2e15, approach 2's exponent with its interval."""
    f3, interval = x["approach3"], x["approach3"]["interval"]
    optimal = next(v for k, v in x["compute_optimal"].items() if k.startswith("3.2e+15"))
    a2 = x["approach2"]
    return [
        *(f"{f3[k]:.3g} [{interval[k][0]:.3g}, {interval[k][1]:.3g}]" for k in ("E", "alpha", "beta")),
        "yes" if f3["converged"] else "no",
        f"{100 * x['held_out']['mean_rel_error']:.1f}%",
        f"{optimal['N']:.3g}",
        f"{optimal['tokens_per_param']:.0f}",
        f"{a2['N_exponent']:.3g} [{a2['interval']['N_exponent'][0]:.3g}, {a2['interval']['N_exponent'][1]:.3g}]",
    ]


def check_column_verdicts(committed: dict, text: str) -> None:
    """The QA column's multiplier at the largest budget is quoted as the fit gives it; the caption and text columns'
    rest on laws that did not converge, so they are not quoted."""
    qa = committed["loss_qa"]["bidirectional"]["compute_multiplier_vs_causal"][0]
    assert f"QA {qa['multiplier']:.3g}x (at most {qa['interval'][1]:.3g}x; {100 * qa['share_never']:.0f}% never" in text
    for col in ("loss_caption", "loss_text"):
        assert not committed[col]["bidirectional"]["compute_multiplier_vs_causal"][0]["from_converged_fits"]
