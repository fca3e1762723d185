"""The fitter: recovers known laws within intervals that cover the truth as often as they claim, keeps every
bootstrap resample, says when a fit is not a fit, names its conventions, and imports no torch."""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import REPO

from scaling.fit import fit_approach3
from scaling.isoflop import fit_approach2
from scaling.law import Law
from scaling.multiplier import compute_multiplier
from scaling.paired import paired_difference
from scaling.report import fit_csv
from scaling.runs import FitError, read_runs

TRUE = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Chinchilla's published fit
BUDGETS = (1e17, 3e17, 1e18, 3e18, 1e19)


def runs(noise=0.005, seed=0, data_multiplier=1.0, sizes=7, budgets=BUDGETS, law=TRUE):
    """IsoFLOP grids (C = 6ND) from a known law with multiplicative noise; a recipe whose data is worth
    `data_multiplier` times more needs exactly that many times less compute on the frontier."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        for N in np.geomspace(1e7, 1e9, sizes):
            D = C / (6 * N)
            rows.append((N, D, law.loss(N, data_multiplier * D) * np.exp(rng.normal(0, noise))))
    return tuple(np.array(x) for x in zip(*rows))


def write_csv(path, recipes: dict[str, tuple], extra: dict | None = None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["params", "tokens", "loss", "recipe", *(extra or {})])
        for name, (N, D, L) in recipes.items():
            for i in range(len(N)):
                w.writerow([N[i], D[i], L[i], name, *(v[i] for v in (extra or {}).values())])
    return path


def test_approach3_recovers_a_known_law_within_its_intervals():
    fit = fit_approach3(*runs(), bootstrap=200, seed=0)
    assert fit["converged"], fit["message"]
    for key in ("E", "A", "B", "alpha", "beta"):
        lo, hi = fit["interval"][key]
        assert lo <= getattr(TRUE, key) <= hi, (key, fit[key], lo, hi)
    assert abs(fit["alpha"] - TRUE.alpha) < 0.05 and abs(fit["beta"] - TRUE.beta) < 0.03
    assert sum(fit["bootstrap_status"].values()) == 200  # every resample accounted for


def test_bootstrap_repeats_under_a_seed():
    data = runs()
    a, b = fit_approach3(*data, bootstrap=30, seed=7), fit_approach3(*data, bootstrap=30, seed=7)
    c = fit_approach3(*data, bootstrap=30, seed=8)
    assert a["interval"] == b["interval"] and a["interval"] != c["interval"]


def _quiet() -> None:
    """A pool worker: no warnings, and one BLAS thread (the fits' matrices are tiny; OpenBLAS threads forked from a
    parent that has used them spin against each other, which made the test 3-7x slower in the full suite)."""
    from threadpoolctl import threadpool_limits

    warnings.simplefilter("ignore")
    threadpool_limits(1)


def _coverage_trial(s: int) -> dict[str, bool]:
    base = fit_approach3(*runs(0.01, 2 * s, sizes=5), bootstrap=40, seed=s, starts=10, level=0.9)
    other = fit_approach3(*runs(0.01, 2 * s + 1, 3.0, sizes=5), bootstrap=40, seed=s + 1000, starts=10, level=0.9)
    m = compute_multiplier(base, other, 1e19, level=0.9)
    hit = {k: base["interval"][k][0] <= getattr(TRUE, k) <= base["interval"][k][1] for k in ("E", "alpha", "beta")}
    hit["multiplier"] = m["interval"][0] <= 3.0 <= m["interval"][1]
    return hit


def test_intervals_cover_the_truth_as_often_as_they_claim():
    """30 synthetic studies (25 runs each, 1% noise) from a known law: the 90% intervals of E, alpha, beta and of a
    3x compute multiplier must contain the truth in at least 80% of them. Dropping resamples, or starting every
    refit at the full-data optimum, narrows intervals and fails this."""
    # the trials are independent: spread over the cores (fork: the workers inherit this module's functions)
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1, initializer=_quiet) as pool:
        trials = pool.map(_coverage_trial, range(30), chunksize=1)
    rates = {k: sum(t[k] for t in trials) / len(trials) for k in trials[0]}
    assert all(r >= 0.8 for r in rates.values()), rates


def test_a_fit_that_does_not_determine_its_law_says_so():
    """Losses that do not depend on N or D: whatever the optimizer returns is not a law."""
    N, D, _ = runs()
    L = 3.0 * np.exp(np.random.default_rng(0).normal(0, 0.01, len(N)))
    with pytest.warns(UserWarning, match="did not converge"):
        fit = fit_approach3(N, D, L, bootstrap=40, seed=0, starts=10)
    assert not fit["converged"]
    assert "do not determine the law" in fit["message"]
    assert ("search bound" in fit["message"]) or ("spans most of the search box" in fit["message"])


def test_approach2_finds_minima_with_intervals_and_rejects_edge_budgets():
    N, D, L = runs(noise=0.0)
    fit = fit_approach2(N, D, L, 6 * N * D, bootstrap=50, target=1e19)
    assert len(fit["minima"]) >= 3
    N_true, _ = TRUE.optimal(np.array([m["flops"] for m in fit["minima"]]))
    for m, n in zip(fit["minima"], N_true):
        assert abs(np.log(m["N"] / n)) < 0.35  # a parabola in log N is an approximation of the true curve
    lo, hi = fit["interval"]["N_exponent"]
    assert lo <= fit["N_exponent"] <= hi and fit["bootstrap"] == 50
    assert fit["interval"]["N_at_target"][0] <= fit["N_at_target"] <= fit["interval"]["N_at_target"][1]
    # A budget whose size grid stops short of its minimum: the smallest loss sits at the largest size.
    N = np.geomspace(1e6, 1e7, 5)
    D = 1e18 / (6 * N)
    edge = fit_approach2(N, D, TRUE.loss(N, D), np.full(5, 1e18))
    assert edge["minima"] == [] and "edge" in edge["rejected"][0]["reason"]
    assert "needs at least 2" in edge["error"]


def test_compute_multiplier_and_report(tmp_path):
    path = write_csv(tmp_path / "runs.csv", {"base": runs(seed=0), "better": runs(seed=1, data_multiplier=3.0)})
    report = fit_csv(path, tmp_path / "fit", ["loss"], "recipe", bootstrap=100, target_flops=1e19)
    at_target, extrapolated = report["losses"]["loss"]["better"]["compute_multiplier_vs_base"]
    for m in (at_target, extrapolated):
        assert abs(m["multiplier"] - 3.0) < 0.3 and m["interval"][0] <= 3.0 <= m["interval"][1]
        assert m["bootstrap"] == 100 and m["interval_kind"] == "two-sided"
        assert m["from_converged_fits"] and not m["caveat"]
    assert extrapolated["target_flops"] == pytest.approx(1e20)
    held = report["losses"]["loss"]["base"]["held_out"]
    assert held["mean_rel_error"] < 0.02 and held["budget"] == pytest.approx(1e19, rel=0.01)
    optimal = report["losses"]["loss"]["base"]["compute_optimal"]["1e+19"]
    assert optimal["N_interval"][0] <= TRUE.optimal(1e19)[0] <= optimal["N_interval"][1]
    saved = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert saved["losses"]["loss"]["base"]["approach3"]["alpha"] == pytest.approx(
        report["losses"]["loss"]["base"]["approach3"]["alpha"]
    )
    assert saved["conventions"]["flops"]["cost_model"]["k"] == pytest.approx(6.0)  # no flops column: 6ND
    assert {"isoflop_loss.png", "recipes_loss.png", "residuals_loss.png"} <= set(report["plots"])


def test_the_baseline_recipe_is_chosen_not_the_csvs_first(tmp_path):
    """A CSV lists its recipes in the order its cells finished; `baseline` fixes which one the others are compared
    with (the multiplier of 1/3x from the other side), and a recipe the CSV lacks is refused."""
    path = write_csv(tmp_path / "runs.csv", {"base": runs(seed=0), "better": runs(seed=1, data_multiplier=3.0)})
    report = fit_csv(path, tmp_path / "fit", ["loss"], "recipe", bootstrap=20, target_flops=1e19, baseline="better")
    fits = report["losses"]["loss"]
    assert "compute_multiplier_vs_base" not in fits["better"]
    at_target = fits["base"]["compute_multiplier_vs_better"][0]
    assert abs(at_target["multiplier"] - 1 / 3) < 0.05
    assert fits["base"]["paired_vs_better"]["mean"] > 0  # the base recipe's loss is the higher in each cell
    with pytest.raises(ValueError, match="baseline recipe 'other' is not in"):
        fit_csv(path, tmp_path / "fit2", ["loss"], "recipe", bootstrap=2, baseline="other")


def test_two_runs_of_a_sweep_fit_as_one_set_and_pair_each_cell_once(tmp_path):
    """The same cells in two CSVs (a design run twice): the fit reads every row, and the cell-by-cell difference
    counts each cell once at the mean of its runs, so a second run shifted by a constant moves it by half that."""
    first = write_csv(tmp_path / "a.csv", {"base": runs(seed=0), "better": runs(seed=1, data_multiplier=3.0)})
    with open(first, newline="") as f:
        rows = list(csv.DictReader(f))
    shifted = [{**r, "loss": f"{float(r['loss']) + (0.02 if r['recipe'] == 'better' else 0.0)}"} for r in rows]
    again = tmp_path / "b.csv"
    with open(again, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(shifted)
    one = read_runs(first, ["loss"], "recipe")
    both = read_runs([first, again], ["loss"], "recipe")
    assert len(both["loss"]) == 2 * len(one["loss"])
    p1 = paired_difference(one, "loss", "base", "better", 0, 0, 0.95)
    p2 = paired_difference(both, "loss", "base", "better", 0, 0, 0.95)
    assert p2["cells"] == p1["cells"] and p2["mean"] == pytest.approx(p1["mean"] + 0.01)
    out = tmp_path / "fit"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scaling",
            "fit",
            str(first),
            str(again),
            "--out",
            str(out),
            "--recipe-col",
            "recipe",
            "--bootstrap",
            "5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "fit.json").read_text())
    assert report["runs"] == len(both["loss"]) and report["csv"] == [str(first), str(again)]


def test_the_bootstrap_draws_cells_with_all_their_runs():
    """With one run a cell, a resample is what drawing runs gave (so fits of such CSVs keep their intervals); with a
    cell run twice, its two runs come and go together."""
    from scaling.fit import cell_indices, cell_resample

    N, D = np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 6.0, 7.0, 8.0])
    cells = cell_indices(N, D)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        assert list(cell_resample(cells, a)) == list(b.integers(0, 4, 4))
    twice = cell_indices(np.concatenate([N, N]), np.concatenate([D, D]))
    assert [list(c) for c in twice] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        drawn = list(cell_resample(twice, rng))
        assert len(drawn) == 8 and all(drawn.count(i) == drawn.count(i + 4) for i in range(4))


def test_a_multiplier_that_never_reaches_the_target_keeps_every_resample():
    """The other recipe's floor E lies above the base's frontier at the target: no finite multiplier. Resamples
    that never get there count in the interval's lower tail instead of being dropped."""
    worse = Law(E=3.0, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    base = fit_approach3(*runs(seed=0, sizes=5), bootstrap=40, seed=0, starts=10)
    other = fit_approach3(*runs(seed=1, sizes=5, law=worse), bootstrap=40, seed=1, starts=10)
    m = compute_multiplier(base, other, 1e23)
    assert m["multiplier"] == 0 and "never gets there" in m["caveat"]
    assert m["bootstrap"] == 40 and m["share_never"] > 0.5
    assert m["interval_kind"] in ("upper bound only", "unbounded") and m["interval"][0] == 0


def test_conventions_are_named_and_unknown_ones_refused(tmp_path):
    N, D, L = runs()
    fpt_attn = 6 * N + 4e3 * N ** (2 / 3)  # a 6N + attention count, as a depth dial gives
    path = write_csv(tmp_path / "r.csv", {"a": (N, D, L)}, {"flops_6n": 6 * N * D, "flops_6n_attn": fpt_attn * D})
    data = read_runs(path, ["loss"], flops="6n+attn")
    assert data["conventions"]["flops"]["column"] == "flops_6n_attn"
    cost = data["cost"]
    assert cost.p < 1 and cost.max_rel_error < 0.05  # attention's share falls with N
    assert read_runs(path, ["loss"], flops="6n")["cost"].k == pytest.approx(6.0)
    with pytest.raises(FitError, match="unknown FLOP convention '7n'"):
        read_runs(path, ["loss"], flops="7n")
    with pytest.raises(FitError, match="parameter convention 'N' is not a column"):
        read_runs(path, ["loss"], params_col="N")
    plain = write_csv(tmp_path / "plain.csv", {"a": (N, D, L)})
    with pytest.raises(FitError, match="needs a 'flops_6n_attn' column"):
        read_runs(plain, ["loss"], flops="6n+attn")


def test_bad_csvs_are_refused_clearly(tmp_path):
    (tmp_path / "a.csv").write_text("params,loss\n1e6,3.0\n")
    with pytest.raises(FitError, match=r"lacks the column\(s\) \['tokens'\]"):
        read_runs(tmp_path / "a.csv", ["loss"])
    (tmp_path / "b.csv").write_text("params,tokens,loss\n1e6,1e7,3.0\n1e6,-5,2.9\n")
    with pytest.raises(FitError, match="'tokens' must be positive and finite; .*b.csv row 3 holds -5"):
        read_runs(tmp_path / "b.csv", ["loss"])
    (tmp_path / "c.csv").write_text("params,tokens,loss\n1e6,1e7,3.0\n")
    with pytest.raises(FitError, match="b.csv row 3 holds -5"):  # several CSVs: the one at fault is named
        read_runs([tmp_path / "c.csv", tmp_path / "b.csv"], ["loss"])
    N, D, L = np.array([1e6, 2e6, 1e6, 2e6]), np.array([1e7, 1e7, 2e7, 2e7]), np.array([3.0, 2.9, 2.8, 2.7])
    with pytest.raises(FitError, match="at least 6 runs over at least 3 distinct sizes"):
        fit_approach3(N, D, L, bootstrap=0)


def test_fitting_a_csv_imports_no_torch(tmp_path):
    """`python -m scaling fit ANY.csv` with torch made unimportable: the fitting half needs numpy, scipy and
    matplotlib only."""
    path = write_csv(tmp_path / "runs.csv", {"base": runs(sizes=5)})
    code = f"""
import runpy, sys
class NoTorch:
    def find_spec(self, name, *args):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["scaling", "fit", {str(path)!r}, "--out", {str(tmp_path / "fit")!r}, "--bootstrap", "20"]
try:
    runpy.run_module("scaling", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
assert "torch" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "converged" in out.stdout and "N: column `params`" in out.stdout
    assert (tmp_path / "fit" / "fit.json").exists() and (tmp_path / "fit" / "report.md").exists()
    saved = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert math.isfinite(saved["losses"]["loss"]["runs"]["approach3"]["E"])


def test_lr_check_names_the_best_factor_and_judges_the_rule(tmp_path):
    """Per (size, budget): the best factor tried, whether it sits at the edge of those tried, and whether the rule's
    LR (factor 1) is within 2x of it; through the CLI from a CSV too."""
    from scaling.lrcheck import describe, lr_check

    def row(size, scale, loss):
        return {"recipe": f"a@lr{scale:g}", "size": size, "budget": "flops=1e+13", "lr_scale": scale, "loss": loss}

    curve = {0.25: 3.0, 0.5: 2.9, 1.0: 2.8, 2.0: 2.75, 4.0: 2.9}  # best at 2x: within
    steep = {0.25: 3.0, 0.5: 2.9, 1.0: 2.8, 2.0: 2.7, 4.0: 2.6}  # best at 4x, the edge: outside
    rows = [row(2, s, v) for s, v in curve.items()] + [row(5, s, v) for s, v in steep.items()]
    rows.append(row(5, 8.0, float("nan")))  # a diverged cell is left out, not taken as best
    small, large = lr_check(rows)
    assert (small["size"], small["best_scale"], small["rule_within"], small["best_at_edge"]) == (2, 2.0, True, False)
    assert small["rule_excess"] == pytest.approx(0.05)
    assert (large["best_scale"], large["rule_within"], large["best_at_edge"]) == (4.0, False, True)
    text = describe([small, large])
    assert "within 2x" in text and "4x the rule's: outside 2x" in text and "edge" in text
    path = tmp_path / "lr.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = subprocess.run(
        [sys.executable, "-m", "scaling", "lrcheck", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == text, out.stderr
    # A check without factor 1, whose rule cells come from the study's own CSV (other cells there, alone in their
    # group, are left out): the same verdicts as one CSV holding all.
    (tmp_path / "check.csv").write_text("".join(x for x in path.read_text().splitlines(True) if ",1.0," not in x))
    study = [r for r in rows if r["lr_scale"] == 1.0] + [row(9, 1.0, 2.0)]
    with open(tmp_path / "study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(study)
    out = subprocess.run(
        [sys.executable, "-m", "scaling", "lrcheck", str(tmp_path / "check.csv"), str(tmp_path / "study.csv")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == text, out.stdout + out.stderr


def test_lr_check_averages_a_repeated_cell_and_counts_a_reused_row_once():
    """A repeat of the check (the same keys trained again) moves each factor to the mean of its runs, which can
    change the verdict; the rule's cell copied into both CSVs (`scaling run --reuse`) is one run, not two."""
    from scaling.lrcheck import describe, lr_check

    def row(scale, loss, wall, reused=""):
        return {"key": f"k{scale:g}", "recipe": f"a@lr{scale:g}", "size": 1, "budget": "flops=1e+14",
                "lr_scale": scale, "loss": loss, "wall_s": wall, "reused_from": reused}  # fmt: skip

    first = [row(0.5, 2.9, 10), row(1.0, 2.8, 11, "study.csv"), row(4.0, 2.6, 12)]
    repeat = [row(0.5, 2.9, 20), row(1.0, 2.8, 11, "study.csv"), row(4.0, 3.2, 22)]
    (alone,) = lr_check(first)
    assert (alone["best_scale"], alone["rule_within"]) == (4.0, False)
    (both,) = lr_check(first + repeat)
    assert both["runs"] == {0.5: 2, 1.0: 1, 4.0: 2}
    assert both["losses"][4.0] == pytest.approx(2.9) and both["losses"][1.0] == pytest.approx(2.8)
    assert (both["best_scale"], both["rule_within"]) == (1.0, True)
    assert "x4: 2.9000 (mean of 2 runs)" in describe([both]) and "x1: 2.8000," in describe([both])


def test_repeats_compares_the_cells_trained_in_both_csvs(tmp_path):
    """`scaling repeats`: per loss column the median and largest change between two runs of the same cells; a row
    reused from another sweep is not a run of either; no shared cell is a clear error."""
    fields = ["key", "recipe", "size", "budget", "loss", "loss_text", "warmup_s", "reused_from"]

    def write(name, rows):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(dict(zip(fields, r, strict=True)) for r in rows)
        return str(tmp_path / name)

    first = write("a.csv", [("k1", "a", 1, "b", 2.0, 3.0, 30, ""), ("k2", "a", 2, "b", 1.5, 2.5, 40, ""),
                            ("k3", "a", 3, "b", 1.0, 2.0, 50, "study.csv")])  # fmt: skip
    again = write("b.csv", [("k1", "a", 1, "b", 2.1, 3.0, 5, ""), ("k2", "a", 2, "b", 1.4, 2.7, 6, ""),
                            ("k3", "a", 3, "b", 1.0, 2.0, 50, "study.csv")])  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "scaling", "repeats", first, again, "--loss", "loss", "--loss", "loss_text"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"2 cells trained in both {first} and {again}")
    assert "loss: median 0.1000, at most 0.1000" in out.stdout
    assert "loss_text: median 0.1000, at most 0.2000 (size 2, a, b)" in out.stdout
    assert f"first steps in {again}: 5.0-6.0 s a cell, 11.0 s in all" in out.stdout
    alone = write("c.csv", [("k9", "a", 1, "b", 2.0, 3.0, 30, "")])
    out = subprocess.run([sys.executable, "-m", "scaling", "repeats", first, alone], cwd=REPO, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0 and "share no cell" in out.stderr


def test_the_plans_time_model_is_fitted_to_measured_cells(capsys):
    """`scaling calibrate`: constants a run's cells were generated from come back; on the fifth study run's 40
    cells the fitted constants plan its measured process-minutes (the spec's guessed ones plan 13% fewer)."""
    from scaling.__main__ import main
    from scaling.spec import load_spec
    from scaling.throughput import calibrate, errors, measured, predict

    rng = np.random.default_rng(0)
    cells = {"flops": 10 ** rng.uniform(13, 15.5, 40), "steps": 10 ** rng.uniform(2.5, 4.3, 40)}
    cells["seconds"] = predict(cells, 2e13, 0.02, 30.0)
    fit = calibrate(cells)
    assert fit == pytest.approx({"flops_per_s": 2e13, "step_s": 0.02, "startup_s": 30.0}, rel=1e-3)

    study = REPO / "docs" / "study" / "study5"
    spec, cells = load_spec(REPO / "configs" / "sweeps" / "study5.yaml"), measured(study / "results.csv")
    t = spec.throughput
    guessed = errors(cells, t.flops_per_s, t.step_s, t.startup_s)
    fitted = errors(cells, **calibrate(cells))
    assert guessed["planned_min"] < 0.9 * guessed["measured_min"]
    assert fitted["planned_min"] == pytest.approx(fitted["measured_min"], rel=0.02)
    assert fitted["median_abs_error"] < guessed["median_abs_error"]
    assert main(["calibrate", str(REPO / "configs/sweeps/study5.yaml"), str(study / "results.csv")]) == 0
    printed = capsys.readouterr().out
    assert f"{fitted['planned_min']:.1f} process-minutes" in printed and "fitted:  throughput: {flops_per_s:" in printed


def test_calibrate_skips_rows_without_timings_and_refuses_none(tmp_path):
    """A results CSV from before start-up was recorded: its rows are counted skips; with none usable, a clear error
    (through the CLI: exit status and message, no traceback)."""
    from scaling.throughput import measured

    fields = ["key", "flops", "steps", "train_s", "startup_s"]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows([{"key": "a", "flops": 1e14, "steps": 100, "train_s": 10, "startup_s": ""}])
        w.writerows([{"key": "b", "flops": 2e14, "steps": 200, "train_s": 20, "startup_s": 5}])
    cells = measured(path)
    assert cells["skipped"] == 1 and list(cells["seconds"]) == [25.0]
    path.write_text("key,flops,steps,train_s\na,1e14,100,10\n")
    with pytest.raises(ValueError, match="no row has flops, steps, train_s, startup_s"):
        measured(path)
    out = subprocess.run(
        [sys.executable, "-m", "scaling", "calibrate", str(REPO / "configs/sweeps/study5.yaml"), str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "error:" in out.stderr and "Traceback" not in out.stderr, out.stderr
