"""Scaling laws: the fitter recovers known laws, rejects what it must, repeats under a seed; the sweep driver
plans, runs, survives being killed, and branches WSD cooldowns."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

from train.scaling import FitError, Law, fit_approach2, fit_approach3, fit_csv, read_runs

TRUE = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Chinchilla's published fit


def synthetic(path, noise=0.005, seed=0, data_multiplier=None, budgets=(1e17, 3e17, 1e18, 3e18, 1e19)):
    """IsoFLOP grids from a known law with multiplicative noise; an optional second recipe whose data is worth
    `data_multiplier` times more (so it needs exactly that many times less compute on the frontier)."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        for N in np.geomspace(1e7, 1e9, 7):
            D = C / (6 * N)
            for recipe, k in (("base", 1.0), ("better", data_multiplier)):
                if k is None:
                    continue
                loss = TRUE.loss(N, k * D) * np.exp(rng.normal(0, noise))
                rows.append({"params": N, "tokens": D, "loss": loss, "recipe": recipe})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_approach3_recovers_a_known_law_within_its_intervals(tmp_path):
    data = read_runs(synthetic(tmp_path / "runs.csv"), ["loss"])
    fit = fit_approach3(data["params"], data["tokens"], data["loss"], bootstrap=200, seed=0)
    assert fit["converged"]
    for key in ("E", "A", "B", "alpha", "beta"):
        lo, hi = fit["interval"][key]
        assert lo <= getattr(TRUE, key) <= hi, (key, fit[key], lo, hi)
    assert abs(fit["alpha"] - TRUE.alpha) < 0.05 and abs(fit["beta"] - TRUE.beta) < 0.03


def test_bootstrap_repeats_under_a_seed(tmp_path):
    data = read_runs(synthetic(tmp_path / "runs.csv"), ["loss"])
    args = (data["params"], data["tokens"], data["loss"])
    a, b = fit_approach3(*args, bootstrap=50, seed=7), fit_approach3(*args, bootstrap=50, seed=7)
    c = fit_approach3(*args, bootstrap=50, seed=8)
    assert a["interval"] == b["interval"] and a["interval"] != c["interval"]


def test_approach2_finds_minima_and_rejects_edge_budgets(tmp_path):
    data = read_runs(synthetic(tmp_path / "runs.csv", noise=0.0), ["loss"])
    fit = fit_approach2(data["params"], data["tokens"], data["loss"], data["flops"])
    assert len(fit["minima"]) >= 3
    N_true, _ = TRUE.optimal(np.array([m["flops"] for m in fit["minima"]]))
    for m, n in zip(fit["minima"], N_true):
        assert abs(np.log(m["N"] / n)) < 0.35  # a parabola in log N is an approximation of the true curve
    # A budget whose size grid stops short of its minimum: the smallest loss sits at the largest size.
    N = np.geomspace(1e6, 1e7, 5)
    D = 1e18 / (6 * N)
    edge = fit_approach2(N, D, TRUE.loss(N, D), np.full(5, 1e18))
    assert edge["minima"] == [] and "edge" in edge["rejected"][0]["reason"]
    assert "needs at least 2" in edge["error"]


def test_compute_multiplier_and_report(tmp_path):
    path = synthetic(tmp_path / "runs.csv", data_multiplier=3.0)
    report = fit_csv(path, tmp_path / "fit", ["loss"], "recipe", bootstrap=100, target_flops=1e19)
    m = report["losses"]["loss"]["better"]["compute_multiplier_vs_base"]
    assert abs(m["multiplier"] - 3.0) < 0.3 and m["interval"][0] <= 3.0 <= m["interval"][1]
    held = report["losses"]["loss"]["base"]["held_out"]
    assert held["mean_rel_error"] < 0.02 and held["budget"] == pytest.approx(1e19, rel=0.01)
    optimal = report["losses"]["loss"]["base"]["compute_optimal"]["1e+19"]
    assert optimal["N_interval"][0] <= TRUE.optimal(1e19)[0] <= optimal["N_interval"][1]
    saved = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert saved["losses"]["loss"]["base"]["approach3"]["alpha"] == pytest.approx(
        report["losses"]["loss"]["base"]["approach3"]["alpha"]
    )
    assert {"isoflop_loss.png", "recipes_loss.png", "residuals_loss.png"} <= set(report["plots"])


def test_bad_csvs_are_refused_clearly(tmp_path):
    (tmp_path / "a.csv").write_text("params,loss\n1e6,3.0\n")
    with pytest.raises(FitError, match=r"lacks the column\(s\) \['tokens'\]"):
        read_runs(tmp_path / "a.csv", ["loss"])
    (tmp_path / "b.csv").write_text("params,tokens,loss\n1e6,1e7,3.0\n1e6,-5,2.9\n")
    with pytest.raises(FitError, match="'tokens' must be positive and finite; row 3 holds -5"):
        read_runs(tmp_path / "b.csv", ["loss"])
    N, D, L = np.array([1e6, 2e6, 1e6, 2e6]), np.array([1e7, 1e7, 2e7, 2e7]), np.array([3.0, 2.9, 2.8, 2.7])
    with pytest.raises(FitError, match="at least 6 runs over at least 3 distinct sizes"):
        fit_approach3(N, D, L, bootstrap=0)


# ----------------------------------------------------------------------------------------------- the driver
@pytest.fixture
def spec(micro_config, tmp_path):
    def make(**extra):
        values = {
            "name": "t",
            "base": str(micro_config),
            "out": str(tmp_path / "sweep"),
            "sizes": [1, 2],
            "tokens_per_param": [0.004, 0.008],
            "recipes": {"a": {}},
            "overrides": {
                "eval": {"every": 0, "max_batches": 1},
                "checkpoint": {"every": 0},
                "logging": {"every": 5, "tensorboard": False, "sample_log": False},
                "data": {"workers": 0, "seq_len": 32},
                "deepspeed": {"zero_stage": 0},
            },
            "hparams": {"batch_tokens_ref": 256},
            "launcher": {"kind": "local", "parallel": 1},
        }
        values.update(extra)
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    return make


def sweep(*args, wait=True):
    cmd = [sys.executable, "-m", "train.sweep", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


def test_sweep_killed_midway_resumes_without_redoing_cells(spec, tmp_path):
    path = spec()
    plan = sweep("plan", path)
    assert plan.returncode == 0 and "4 runs" in plan.stdout, plan.stdout + plan.stderr
    out = tmp_path / "sweep"
    proc = sweep("run", path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "results.csv").exists() and len(rows(out)) >= 1):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # the driver dies; the cell it had started may be left half-done
    proc.wait()
    time.sleep(1)  # and the kernel kills that cell with it: none trains on unsupervised (to race a resumed sweep)
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(out).encode() in _cmdline(p)]
    done = {r["key"]: (out / "cells" / r["key"] / "summary.json").stat().st_mtime for r in rows(out)}
    assert 1 <= len(done) < 4
    result = sweep("run", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(done)} of 4 cells already finished" in result.stdout
    final = rows(out)
    assert len(final) == 4 and len({r["key"] for r in final}) == 4
    for key, mtime in done.items():  # finished cells were not run again
        assert (out / "cells" / key / "summary.json").stat().st_mtime == mtime
    assert all(float(r["loss"]) > 0 and int(r["tokens"]) > 0 for r in final)
    for r in final:  # the budget was honoured: tokens trained = tokens per parameter x N (up to one step)
        config = yaml.safe_load((out / "cells" / r["key"] / "config.yaml").read_text())
        step_tokens = config["data"]["batch_size"] * config["data"]["seq_len"]
        target = float(r["budget"].split("=")[1]) * int(r["params"])
        assert target <= int(r["tokens"]) < target + step_tokens
    again = sweep("run", path)
    assert "4 of 4 cells already finished" in again.stdout and len(rows(out)) == 4  # append-only, idempotent


def test_wsd_cooldowns_branch_from_the_stable_run(spec, tmp_path):
    path = spec(schedule="wsd", sizes=[1], cooldown_fraction=0.5)
    result = sweep("run", path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "sweep"
    trunks = [p for p in (out / "cells").iterdir() if p.name.startswith("trunk-")]
    assert len(trunks) == 1
    branch_points = sorted(int(p.name.split("_")[1]) for p in (trunks[0] / "checkpoints").glob("step_*"))
    final = rows(out)
    assert len(final) == 2
    starts = []
    for r in final:
        log = (out / "logs" / f"{r['key']}.log").read_text()
        start = int(log.split(f"{trunks[0]}/checkpoints/step_")[1][:8])  # "resumed from <trunk>/checkpoints/..."
        starts.append(start)
        logged = [json.loads(line) for line in (out / "cells" / r["key"] / "metrics.jsonl").read_text().splitlines()]
        assert min(m["step"] for m in logged if "loss" in m) > start  # nothing before the branch point was rerun
        assert int(r["steps"]) > start
    assert sorted(starts) == branch_points  # each budget branched where its own cooldown begins


def test_results_csv_is_append_only_and_widens_for_new_loss_columns(tmp_path):
    """One row per cell, never twice; a cell with a new per-source loss adds its column and keeps earlier rows."""
    from train.sweep import Cell, SweepSpec, record

    spec = SweepSpec(name="t", base="b.yaml", out=str(tmp_path), sizes=[1], tokens_per_param=[1.0])
    for key, val in (
        ("c1", {"text_loss": 3.0, "text/text_loss": 3.0}),
        ("c2", {"text_loss": 2.0, "caption/text_loss": 1.5}),
    ):
        run = tmp_path / key
        run.mkdir()
        summary = {"tokens": 100, "flops": 1e6, "steps": 2, "wall_s": 1.0, "final_val": val}
        (run / "summary.json").write_text(json.dumps(summary))
        cell = Cell("a", 1, "tpp=1", 0, [f"run_dir={run}"], key=key, params=10)
        record(spec, cell)
        record(spec, cell)  # a second call for the same cell writes nothing
    table = rows(tmp_path)
    assert [r["key"] for r in table] == ["c1", "c2"]
    assert (table[0]["loss_text"], table[0]["loss_caption"]) == ("3.0", "")
    assert (table[1]["loss_text"], table[1]["loss_caption"]) == ("", "1.5")
    assert [r["loss"] for r in table] == ["3.0", "2.0"]
