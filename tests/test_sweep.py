"""The sweep driver: plans that do not depend on the launcher, keys that change only with the weights, grids
around each budget's optimum, cells spread over devices, runs that survive being killed, WSD branches, and bad
input refused before any cell starts."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from scaling.cellfile import CellFileError, read_cells, write_cells
from scaling.plan import Cell, plan
from scaling.results import record
from scaling.spec import SweepSpec, _minutes, load_spec
from train.config import ConfigError, build


@pytest.fixture
def spec(micro_config, tmp_path):
    def make(name="spec.yaml", **extra):
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
            "hparams": {"batch_tokens_ref": 256, "rows_multiple": 4},
            "grid": {"sane_tokens_per_param": [0.001, 1000]},
            "launcher": {"kind": "local", "parallel": 1, "gpus": []},
        }
        for key, value in extra.items():  # one level of merging: launcher={"nproc": 4} keeps the other keys
            values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(values))
        return path

    return make


def sweep(*args, wait=True, env=None):
    cmd = [sys.executable, "-m", "scaling", *map(str, args)]
    if not wait:  # in a session of its own, as under `timeout`: a signal to its group reaches nothing of pytest
        return subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------- planning
def test_batch_is_global_whatever_the_launcher(spec):
    """nproc 1 and 4 (and a micro-batch cap) give every cell the same tokens per step, LR, warmup and steps."""
    one = plan(load_spec(spec("one.yaml")))
    four = plan(load_spec(spec("four.yaml", launcher={"nproc": 4, "max_micro_rows": 1})))
    assert len(one.cells) == len(four.cells) == 4
    for a, b in zip(one.cells, four.cells):
        assert (a.tokens_per_step, a.lr, a.warmup_steps, a.steps, a.beta2) == (
            b.tokens_per_step,
            b.lr,
            b.warmup_steps,
            b.steps,
            b.beta2,
        )
        assert b.micro_rows == 1 and 4 * b.micro_rows * b.grad_accum == b.rows == a.rows
        assert a.micro_rows * a.grad_accum == a.rows
        seq = a.config["data"]["seq_len"]
        assert b.config["data"]["batch_size"] * b.config["deepspeed"]["grad_accum"] * 4 * seq == b.tokens_per_step


def test_hparams_follow_the_rule_in_n(spec):
    cells = plan(load_spec(spec())).cells
    small, large = sorted({(c.params, c.lr, c.tokens_per_step) for c in cells})
    ratio = large[0] / small[0]
    assert large[1] / small[1] == pytest.approx(ratio ** (-1 / 3))  # LR ~ N^-1/3
    assert large[2] >= small[2]  # tokens per step ~ N^2/3, in whole multiples of rows_multiple rows
    assert all(c.beta2 == 0.99 for c in cells)  # well below 0.5M tokens per step


def test_min_rows_floors_the_small_models_batch_only():
    """hparams.min_rows: the rule's rows where they exceed the floor, the floor (rounded to rows_multiple) below it;
    without a floor, the rule alone (so no existing cell changes)."""
    from scaling.hparams import HparamRule

    rule = dict(n_ref=1e7, batch_tokens_ref=131072, rows_multiple=8)
    plain, floored = HparamRule(**rule), HparamRule(**rule, min_rows=30)
    assert plain.rows_per_step(4e4, 512) == 8 and floored.rows_per_step(4e4, 512) == 32
    assert plain.rows_per_step(4e6, 512) == floored.rows_per_step(4e6, 512) == 136
    # the LR follows a floored batch by the square-root rule; above the floor, and without one, the rule's LR
    assert floored.lr(4e4, 512) == pytest.approx(plain.lr(4e4, 512) * 2) and plain.lr(4e4, 512) == plain.lr(4e4)
    assert floored.lr(4e6, 512) == plain.lr(4e6, 512) == plain.lr(4e6)
    with pytest.raises(ConfigError, match="min_rows"):
        HparamRule(min_rows=-1)


def test_keys_change_with_the_weights_only(spec, micro_config, tmp_path):
    keys = lambda p: [c.key for c in plan(load_spec(p)).cells]  # noqa: E731
    base = keys(spec())
    assert keys(spec("quiet.yaml", overrides={"logging": {"every": 1}, "eval": {"every": 3, "max_batches": 1}})) == base
    lr = keys(spec("lr.yaml", hparams={"lr_ref": 1e-3}))
    assert not set(lr) & set(base)
    edited = tmp_path / "edited.yaml"  # the base config edited: new cells, and new trunks
    cfg = yaml.safe_load(Path(micro_config).read_text())
    cfg["optim"] = {**cfg.get("optim", {}), "weight_decay": 0.05}
    edited.write_text(yaml.safe_dump(cfg))
    wsd = keys(spec("wsd.yaml", schedule="wsd"))
    wsd_edited = keys(spec("wsd2.yaml", schedule="wsd", base=str(edited)))
    assert [k for k in wsd if k.startswith("trunk-")] and not set(wsd) & set(wsd_edited)


def test_grid_places_sizes_around_each_budget_and_warns(spec):
    s = spec(
        sizes=[1, 2, 3, 4],
        tokens_per_param=[],
        flops=[1e11, 1e13],
        grid={"sizes_per_budget": 2, "tokens_per_param": 0.05},
        launcher={"time_limit_min": 0.01},
        throughput={"flops_per_s": 1e9, "startup_s": 0},
    )
    p = plan(load_spec(s))
    by_budget = {}
    for c in p.cells:
        by_budget.setdefault(c.budget, []).append(c.size)
    assert by_budget == {"flops=1e+11": [1, 2], "flops=1e+13": [3, 4]}  # more compute, larger models
    for c in p.cells:  # each budget's FLOPs in the spec's convention (6N + attention), up to one step
        C = float(c.budget.split("=")[1])
        assert C <= c.flops < C + c.flops / c.steps + 1
    assert any("exceeds the launcher's limit" in w for w in p.warnings)
    assert any("expected optimum is at the" in w for w in p.warnings)
    assert _minutes("1-02:30:00") == 1590 and _minutes("90") == 90 and _minutes("4:00:00") == 240
    # a host floor per step: a many-step cell costs its steps, not its FLOPs, and the driver starts it first
    floor = plan(load_spec(spec("floor.yaml", throughput={"flops_per_s": 1e15, "startup_s": 2, "step_s": 0.5})))
    for c in floor.cells:
        assert c.minutes * 60 == pytest.approx(max(c.flops / 1e15, c.steps * 0.5) + 2)


def test_short_cells_take_fewer_rows_to_reach_min_steps(spec):
    """grid.min_steps: a cell whose budget buys few steps at the rule's batch trains on fewer rows per step
    (a multiple of rows_multiple), so its loss is not the warmup's; cells that already take enough are unchanged."""
    rule = {"batch_tokens_ref": 1024, "rows_multiple": 2}
    plain = {(c.size, c.budget): c for c in plan(load_spec(spec(hparams=rule))).cells}
    p = plan(load_spec(spec("short.yaml", hparams=rule, grid={"min_steps": 6})))
    changed = 0
    for c in p.cells:
        before = plain[(c.size, c.budget)]
        assert c.rows % 2 == 0 and c.rows <= before.rows
        if before.steps >= 6 or before.rows == 2:
            assert (c.rows, c.key) == (before.rows, before.key)
        else:
            changed += 1
            assert c.rows < before.rows and (c.steps >= 6 or c.rows == 2)
            assert any(f"size {c.size}, {c.budget}: {before.rows} rows per step" in w for w in p.warnings)
    assert changed


def test_bad_specs_are_refused_before_any_cell_starts(spec, tmp_path):
    for extra, message in (
        ({"launcher": {"gpu": [0]}}, "unknown config key 'launcher.gpu' (did you mean 'gpus'?)"),
        ({"flops_convention": "6nd"}, "flops_convention '6nd' is not one of"),
        ({"params_convention": "N"}, "params_convention 'N' is not one of"),
        ({"launcher": {"gpus": [7]}}, "launcher.gpus names device(s) [7] that do not exist here"),
        ({"overrides": {"optim": {"lrr": 1}}}, "unknown config key 'optim.lrr'"),
    ):
        result = sweep("run", spec(**extra))
        assert result.returncode != 0 and message in result.stderr, (extra, result.stderr)
    assert not (tmp_path / "sweep" / "cells").exists()


def test_cells_files_carry_any_value_and_refuse_bad_lines(tmp_path):
    args = [["c.yaml", "optim.betas=[0.9, 0.99]", 'run_dir=/a dir/with "quotes"']]
    path = write_cells(tmp_path / "cells.txt", args)
    assert read_cells(path) == args
    printed = subprocess.run(
        [sys.executable, "-m", "scaling.cellfile", str(path), "0"], cwd=REPO, capture_output=True, text=True
    )
    assert printed.stdout.split("\0") == args[0]
    path.write_text(path.read_text() + "c.yaml optim.lr=1\n")  # edited by hand into something else
    with pytest.raises(CellFileError, match=r"cells.txt:2: not a JSON array"):
        read_cells(path)
    bad = subprocess.run([sys.executable, "-m", "scaling.cellfile", str(path), "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cells.txt:2" in bad.stderr


# -------------------------------------------------------------------------------------------------- running
def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


def test_sweep_killed_midway_resumes_without_redoing_cells(spec, tmp_path):
    path = spec()
    plan_out = sweep("plan", path)
    assert plan_out.returncode == 0 and "4 runs" in plan_out.stdout, plan_out.stdout + plan_out.stderr
    out = tmp_path / "sweep"
    proc = sweep("run", path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "results.csv").exists() and len(rows(out)) >= 1):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # the driver dies; the cell it had started may be left half-done
    proc.wait()
    time.sleep(1)  # and the kernel kills that cell with it: none trains on unsupervised (to race a resumed sweep)
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(out).encode() in _cmdline(p)]
    boxed = sweep("run", path, "--launch-for", 0)  # a time box already over: starts nothing, says what is left
    assert boxed.returncode == 0, boxed.stdout + boxed.stderr
    # (it records a cell that wrote its summary as the driver died, before the driver could)
    done = {r["key"]: (out / "cells" / r["key"] / "summary.json").stat().st_mtime for r in rows(out)}
    assert 1 <= len(done) < 4
    assert f"{4 - len(done)} cell(s) not started; run again" in boxed.stdout
    result = sweep("run", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(done)} of 4 cells already finished" in result.stdout
    final = rows(out)
    assert len(final) == 4 and len({r["key"] for r in final}) == 4
    for key, mtime in done.items():  # finished cells were not run again
        assert (out / "cells" / key / "summary.json").stat().st_mtime == mtime
    for r in final:
        assert float(r["loss"]) > 0 and int(r["tokens"]) > 0
        # the whole cost: start-up (launch to first step) and training, each its own column
        assert float(r["wall_s"]) >= float(r["train_s"]) + float(r["startup_s"]) - 0.01
        assert float(r["startup_s"]) > 0  # a warm worker's second cell: milliseconds on this CPU
        # the budget was honoured: tokens trained = tokens per parameter x N (up to one step)
        target = float(r["budget"].split("=")[1]) * int(r["params"])
        assert target <= int(r["tokens"]) < target + int(r["tokens_per_step"])
        assert r["flops_convention"] == "6n+attn" and float(r["flops"]) == float(r["flops_6n_attn"])
        # epochs of each source read: samples the loader drew from it over the samples its manifest lists
        summary = json.loads((out / "cells" / r["key"] / "summary.json").read_text())
        for src in yaml.safe_load((out / "cells" / r["key"] / "cell.yaml").read_text())["data"]["sources"]:
            n = json.loads((Path(src["shards"]) / "manifest.json").read_text())["samples"]
            read = summary["data_counts"].get(f"source/{src['name']}", 0)  # a tiny cell may never draw one
            assert float(r[f"epochs_{src['name']}"]) == pytest.approx(read / n, abs=1e-4)
        assert sum(v for k, v in summary["data_counts"].items() if k.startswith("source/")) > 0
    again = sweep("run", path)
    assert "4 of 4 cells already finished" in again.stdout and len(rows(out)) == 4  # append-only, idempotent
    # the driver's own time: four runs started, the killed one never recorded its end; the split is the CSV's
    from scaling.gputime import gpu_time

    spans = [json.loads(line) for line in (out / "driver.jsonl").read_text().splitlines()]
    assert sum("start" in s for s in spans) == 4 and sum("end" in s for s in spans) == 3
    starts = {s["run"]: s["start"] for s in spans if "start" in s}
    ends = {s["run"]: s["end"] for s in spans if "end" in s}
    (killed,) = set(starts) - set(ends)
    ends[killed] = max(s["seen"] for s in spans if s["run"] == killed and "seen" in s)  # its last heartbeat
    t = gpu_time(out)
    assert t["runs"] == 4 and t["runs_without_end"] == 1 and t["runs_dated_by_heartbeat"] == 1 and t["cells"] == 4
    assert t["wall_s"] == pytest.approx(sum(ends[r] - starts[r] for r in starts))
    assert t["train_s"] == pytest.approx(sum(float(r["train_s"]) for r in final))
    assert t["slot_s"] == pytest.approx(t["wall_s"])  # the spec runs one cell at a time on CPU
    # each cell timed its first steps (its compile): start-up, not training, in the split
    from scaling.results import warmup

    timed = 0
    for r in final:
        summary = json.loads((out / "cells" / r["key"] / "summary.json").read_text())
        assert 1 <= summary["first_steps"] <= 5 * 2 and str(warmup(summary)) == r["warmup_s"]
        if summary["steps"] > summary["first_steps"]:  # past its first steps: the compile told from the rest
            timed += 1
            assert float(r["warmup_s"]) >= 0
    assert timed and t["cells_untimed"] == 4 - timed
    # and its start-up stage by stage (the last process's): the stages add up to that process's start-up
    stages = ("launch", "distributed", "engine", "resume", "objective", "rest")
    for r in final:
        summary = json.loads((out / "cells" / r["key"] / "summary.json").read_text())
        assert list(summary["startup_phases"]) == list(stages)
        assert [float(r[f"startup_{s}_s"]) for s in stages] == list(summary["startup_phases"].values())
        assert all(v >= 0 for v in summary["startup_phases"].values())
        last = summary["ended_at"] - summary["launched_at"]  # this process's launch to its end
        assert sum(summary["startup_phases"].values()) <= min(last, summary["startup_s"]) + 0.01
    assert list(t["startup_phases"]) == list(stages)
    assert t["steps_s"] == pytest.approx(t["train_s"] - sum(float(r["warmup_s"] or 0) for r in final))
    shown = sweep("time", path)
    assert shown.returncode == 0 and f"| {t['steps_s']:.0f} | {100 * t['train_share']:.1f}% |" in shown.stdout
    assert "and first steps' compile (median" in shown.stdout
    assert "start-up, median seconds a cell by stage: launch " in shown.stdout
    assert "1 driver run(s) started and never recorded an end (killed): 1 end at their last heartbeat" in shown.stdout
    # the plan's time model fitted to these four measured cells: it plans what they took
    calibrated = sweep("calibrate", path)
    measured_min = sum(float(r["train_s"]) + float(r["startup_s"]) for r in final) / 60
    assert calibrated.returncode == 0 and f"4 cells measured: {measured_min:.1f} process-minutes" in calibrated.stdout
    assert "fitted:  throughput: {flops_per_s:" in calibrated.stdout, calibrated.stdout
    # the CSV is the record: with the cell directories gone (cleaned, or the study continued on another machine
    # from its committed results) no recorded cell trains again
    shutil.rmtree(out / "cells")
    moved = sweep("run", path)
    assert "4 of 4 cells already finished" in moved.stdout and not (out / "cells").exists(), moved.stdout
    assert rows(out) == final
    # a driver from before the heartbeat: a killed run with no `seen` ends at the next run's start (an upper bound)
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.csv").write_text((out / "results.csv").read_text())
    (old / "driver.jsonl").write_text(
        "\n".join(
            json.dumps(x)
            for x in (
                {"start": 100.0, "slots": 8, "gpus": 1, "run": "a"},
                {"start": 700.0, "slots": 8, "gpus": 1, "run": "b"},
                {"run": "b", "end": 1000.0},
                {"start": 1100.0, "slots": 8, "gpus": 1, "run": "c"},  # killed last, undated: left out
            )
        )
    )
    t = gpu_time(old)
    assert (t["runs"], t["runs_without_end"], t["runs_dated_by_next_start"], t["wall_s"]) == (2, 2, 1, 900.0)
    assert t["slot_s"] == 7200.0


def test_sweep_stopped_by_sigterm_checkpoints_its_cells_and_resumes_them(spec, tmp_path):
    """A time box's SIGTERM, sent as coreutils' `timeout` sends it, to the driver's whole process group: running
    cells finish their step and checkpoint, none starts, the driver exits with EXIT_REQUEUE; the next run resumes
    the interrupted cell rather than starting it over."""
    path = spec(sizes=[1], tokens_per_param=[0.3], overrides={"logging": {"every": 1}})
    out = tmp_path / "sweep"
    proc = sweep("run", path, wait=False)
    deadline = time.time() + 300
    logs = out / "logs"
    while time.time() < deadline and not any("step 3/" in p.read_text() for p in logs.glob("*.log")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, stdout
    assert "stopped by SIGTERM: 1 cell(s) interrupted (1 checkpointed at their step, 0 stopped" in stdout
    assert not (out / "results.csv").exists()
    (log,) = logs.glob("*.log")
    saved = int(log.read_text().split("received SIGTERM: saved step ")[1].split(",")[0])
    result = sweep("run", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in log.read_text() and f"at step {saved}" in log.read_text()
    (row,) = rows(out)
    assert int(row["steps"]) > saved


def test_a_failing_cell_does_not_take_the_running_ones_down(spec, tmp_path):
    """Two cells at once, one of which fails at start (its tokenizer does not exist): the other still finishes and
    records its row, and the driver then exits in error naming the failed cell, which stays unfinished for the next
    run."""
    path = spec(sizes=[1], tokens_per_param=[0.004])
    values = yaml.safe_load(path.read_text())
    values["recipes"] = {"ok": {}, "bad": {"data": {"tokenizer": str(tmp_path / "no-such.model")}}}
    values["launcher"]["parallel"] = 2
    path.write_text(yaml.safe_dump(values))
    bad = next(c for c in plan(load_spec(path)).cells if c.recipe == "bad")
    result = sweep("run", path)
    assert result.returncode != 0
    assert f"FAILED {bad.key}" in result.stdout and f"1 cell(s) failed: {bad.key}" in result.stderr, result.stderr
    (row,) = rows(tmp_path / "sweep")
    assert row["recipe"] == "ok"
    assert not (bad.run_dir / "summary.json").exists()


def test_warm_workers_train_cell_after_cell_as_fresh_processes_would(spec, tmp_path):
    """One slot, four cells: on a warm worker they all train in one process, and each gives the losses (bitwise, on
    the CPU) that it gives in a process of its own, as train.py launched cell by cell did."""
    losses = {}
    for warm in (True, False):
        out = tmp_path / f"warm-{warm}"  # `--out`: the spec's design into a directory other than its `out`
        path = spec(f"{warm}.yaml", launcher={"warm_workers": warm})
        result = sweep("run", path, "--out", out)
        assert result.returncode == 0, result.stdout + result.stderr
        pids = {json.loads((out / "cells" / r["key"] / "summary.json").read_text())["pid"] for r in rows(out)}
        assert len(pids) == (1 if warm else 4)
        # the first cell a process trains starts it; the others start warm, and `scaling time` tells them apart
        assert sorted(r["warm_start"] for r in rows(out)) == (["0", "1", "1", "1"] if warm else ["0"] * 4)
        shown = sweep("time", out)
        assert shown.returncode == 0, shown.stderr
        fresh = "over the 1 cell(s) that started a process" if warm else "over the 4 cell(s) that started a process"
        assert fresh in shown.stdout and ("over the 3 cell(s) on a warm worker" in shown.stdout) == warm
        losses[warm] = {r["key"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in rows(out)}
    assert len(losses[True]) == 4 and losses[True] == losses[False]
    assert not (tmp_path / "sweep").exists()


def test_a_warm_worker_killed_mid_cell_fails_that_cell_and_the_next_gets_a_fresh_one(spec, tmp_path):
    """One slot, two cells: the worker is SIGKILLed in its first cell's third step. The driver reads the worker's
    death as that cell's failure (exit -9), starts the other cell on a new worker, and ends in error naming the
    killed cell, which stays unfinished for the next run."""
    path = spec(sizes=[1, 2], tokens_per_param=[0.1], overrides={"logging": {"every": 1}})
    out = tmp_path / "sweep"
    proc = sweep("run", path, wait=False)
    logs, deadline = out / "logs", time.time() + 300
    while time.time() < deadline and not any("step 3/" in p.read_text() for p in logs.glob("*.log")):
        time.sleep(0.2)
    (victim,) = [p for p in logs.glob("*.log") if "step 3/" in p.read_text()]
    workers = [p for p in Path("/proc").glob("[0-9]*") if b"scaling.worker" in _cmdline(p)]
    workers = [p for p in workers if str(out).encode() in _cmdline(p)]
    assert len(workers) == 1
    os.kill(int(workers[0].name), signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, stdout
    assert f"FAILED {victim.stem} (exit -9)" in stdout and f"1 cell(s) failed: {victim.stem}" in stdout, stdout
    (row,) = rows(out)
    assert row["key"] != victim.stem
    pids = {json.loads((out / "cells" / row["key"] / "summary.json").read_text())["pid"]}
    assert pids != {int(workers[0].name)}  # the surviving cell ran on a fresh worker


def test_lr_scales_train_multiples_of_the_rules_lr(spec):
    """An LR check: each (size, budget) at the rule's LR times each factor, as recipes that no fit mixes; the cell at
    factor 1 is the very cell of the plain sweep (same key: same weights)."""
    plain = {(c.size, c.budget): c for c in plan(load_spec(spec())).cells}
    cells = plan(load_spec(spec("lr.yaml", lr_scales=[0.5, 1.0, 2.0]))).cells
    assert len(cells) == 3 * len(plain)
    for c in cells:
        base = plain[(c.size, c.budget)]
        assert c.recipe == f"a@lr{c.lr_scale:g}" and c.lr == pytest.approx(base.lr * c.lr_scale)
        assert c.config["optim"]["lr"] == pytest.approx(c.lr)
        assert (c.key == base.key) == (c.lr_scale == 1.0)
    with pytest.raises(ConfigError, match="lr_scales"):
        load_spec(spec("bad.yaml", lr_scales=[0.0]))


def test_local_cells_get_their_own_devices_and_ports(spec, tmp_path):
    """Four 'GPUs' (CUDA_VISIBLE_DEVICES on a CPU host: the driver hands them out, the cells run on CPU): the
    four cells run at once, and each reads back its own device and rendezvous port from its environment."""
    path = spec(launcher={"gpus": None, "cells_per_gpu": 1})
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    result = sweep("run", path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on 4 GPU(s)" in result.stdout
    out = tmp_path / "sweep"
    summaries = [json.loads((out / "cells" / r["key"] / "summary.json").read_text()) for r in rows(out)]
    assert len(summaries) == 4
    overlapping = 0
    for i, a in enumerate(summaries):
        for b in summaries[i + 1 :]:
            if a["launched_at"] < b["ended_at"] and b["launched_at"] < a["ended_at"]:
                overlapping += 1
                assert a["launch"]["CUDA_VISIBLE_DEVICES"] != b["launch"]["CUDA_VISIBLE_DEVICES"]
                assert a["launch"]["MASTER_PORT"] != b["launch"]["MASTER_PORT"]
    assert overlapping >= 3  # they did run side by side
    assert {s["launch"]["CUDA_VISIBLE_DEVICES"] for s in summaries} <= {"0", "1", "2", "3"}


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


def test_results_csv_is_append_only_and_widens_for_new_loss_columns(micro_config, tmp_path):
    """One row per cell, never twice; a cell with a new per-source loss adds its column and keeps earlier rows."""
    from train.config import load_config, to_dict

    config = to_dict(load_config(micro_config))
    for key, val in (
        ("c1", {"text_loss": 3.0, "text/text_loss": 3.0}),
        ("c2", {"text_loss": 2.0, "caption/text_loss": 1.5}),
    ):
        run = tmp_path / key
        run.mkdir()
        summary = {"tokens": 100, "flops": 1e6, "flops_6n": 9e5, "steps": 2, "wall_s": 1.0, "final_val": val}
        (run / "summary.json").write_text(json.dumps(summary))
        cell = Cell("a", 1, "tpp=1", 0, {**config, "run_dir": str(run)}, key=key, params=10)
        assert record(tmp_path, cell, "6n")
        assert not record(tmp_path, cell, "6n")  # a second call for the same cell writes nothing
    table = rows(tmp_path)
    assert [r["key"] for r in table] == ["c1", "c2"]
    assert (table[0]["loss_text"], table[0]["loss_caption"]) == ("3.0", "")
    assert (table[1]["loss_text"], table[1]["loss_caption"]) == ("", "1.5")
    assert [r["loss"] for r in table] == ["3.0", "2.0"]
    assert [r["flops"] for r in table] == ["900000.0", "900000.0"]  # the 6N count, as asked


def test_warmup_is_the_first_steps_beyond_the_steady_rate():
    from scaling.results import warmup

    # 5 first steps in 10 s, then 100 more in 10 s (0.1 s each): 9.5 s of the first were not steps' work
    assert warmup({"first_steps_s": 10.0, "first_steps": 5, "steps": 105, "train_s": 20.0}) == 9.5
    assert warmup({"first_steps_s": 0.4, "first_steps": 5, "steps": 105, "train_s": 10.4}) == 0.0  # no compile
    assert warmup({"steps": 105, "train_s": 20.0}) == ""  # a run that did not time them: unknown, not zero


def test_spec_types_are_checked():
    with pytest.raises(ConfigError, match="exactly one of tokens_per_param or flops"):
        build(SweepSpec, {"name": "x", "base": "b", "out": "o", "sizes": [1]})


def test_cells_of_one_compiled_shape_wait_for_its_first_compile(spec, tmp_path):
    """Two sizes at two LRs, compiled, three slots, a fresh inductor cache: each size's first cell starts at once
    (one shape does not hold up another), and its sibling starts only once that cell has written its first steps'
    marker (its graphs then in the cache), rather than compiling the same graphs beside it."""
    from scaling.local import compile_shape
    from train.rundir import FIRST_STEPS_FILE

    path = spec(
        lr_scales=[0.5, 1.0],
        tokens_per_param=[0.008],
        overrides={"deepspeed": {"zero_stage": 0, "compile": True}},
        launcher={"parallel": 3},
    )
    cells = plan(load_spec(path)).cells
    shapes = {compile_shape(c) for c in cells}
    assert len(cells) == 4 and len(shapes) == 2 and None not in shapes  # the LR is no part of a shape
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = sweep("run", path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    firsts = []
    for size in (1, 2):
        mine = [c for c in cells if c.size == size]
        started = {c.key: json.loads((c.run_dir / "summary.json").read_text())["launched_at"] for c in mine}
        first, second = sorted(mine, key=lambda c: started[c.key])
        marker = first.run_dir / FIRST_STEPS_FILE
        assert json.loads(marker.read_text())["step"] == 5
        assert started[second.key] >= marker.stat().st_mtime > started[first.key]
        firsts.append((started[first.key], marker.stat().st_mtime))
    (a_start, a_done), (b_start, b_done) = sorted(firsts)
    assert b_start < a_done  # the two shapes compiled side by side


def test_a_studys_two_image_masks_are_one_compiled_shape():
    """The fifth study's 40 cells: 16 (size, micro-batch, mask) combinations, 8 compiled shapes, since the model
    reads its image mask as data; where the mask picks the kernel (flash-attn serves causal only) it stays apart."""
    from scaling.local import compile_shape

    cells = plan(load_spec(REPO / "configs" / "sweeps" / "study5.yaml")).cells
    assert len({(c.size, c.micro_rows, c.config["model"]["image_mask"]) for c in cells}) == 16
    assert len({compile_shape(c) for c in cells}) == 8
    a, b = (next(c for c in cells if c.size == 4 and c.recipe == r) for r in ("bidirectional", "causal"))
    for cell in (a, b):
        cell.config["model"]["attention_backend"] = "flash"
    assert compile_shape(a) != compile_shape(b)


def test_the_compile_gate_lets_a_shape_go_once_compiled_and_passes_a_failed_compile_on(spec):
    """After a shape's first cell is past its first steps, all its other cells start at once; a first cell that
    stops short hands the compile to the next; a marker from an earlier process of the cell does not count."""
    from scaling.local import CompileGate
    from train.rundir import FIRST_STEPS_FILE

    path = spec(
        lr_scales=[0.5, 1.0, 2.0], sizes=[1], tokens_per_param=[0.008], overrides={"deepspeed": {"compile": True}}
    )
    a, b, c = plan(load_spec(path)).cells
    for cell in (a, b, c):
        cell.run_dir.mkdir(parents=True)
    marker = a.run_dir / FIRST_STEPS_FILE
    marker.write_text("{}")
    os.utime(marker, (time.time() - 60, time.time() - 60))  # an earlier segment's
    gate = CompileGate()
    gate.started(a, time.time() - 1)
    gate.settle({a.key})
    assert gate.blocked(b) and gate.blocked(c)
    marker.write_text("{}")  # this process's first steps done
    gate.settle({a.key})
    assert not gate.blocked(b)
    gate.started(b, time.time())
    assert not gate.blocked(c)  # the shape is compiled: b does not hold c up

    gate = CompileGate()
    gate.started(b, time.time())
    gate.settle(set())  # b stopped before its first steps were done
    assert not gate.blocked(c)
    gate.started(c, time.time())
    assert gate.blocked(a)  # c compiles now
    off = CompileGate(on=False)
    off.started(a, time.time())
    assert not off.blocked(b)


def test_a_sweep_reads_the_row_store_it_builds_once(spec, tmp_path):
    """Cells whose data section names a row store (`data.rows`): `run` refuses before any cell starts while the store
    is missing or too small for the largest cell, `store` builds it sized for the plan (and again for a sweep that
    needs more), and the cells train from its rows."""
    from data.rows import RowStore
    from scaling.plan import plan, store_rows
    from scaling.spec import load_spec

    store = tmp_path / "rows"
    data = {"workers": 1, "seq_len": 32, "rows": str(store)}
    overrides = yaml.safe_load(spec().read_text())["overrides"]
    path = spec("stored.yaml", overrides={**overrides, "data": data})
    result = sweep("run", path)
    assert result.returncode != 0 and "not built" in result.stderr and "scaling store" in result.stderr
    assert not (tmp_path / "sweep" / "results.csv").exists()
    built = sweep("store", path)
    assert built.returncode == 0 and "built" in built.stdout, built.stdout + built.stderr
    need = store_rows(plan(load_spec(path)), 1)[str(store)]
    assert RowStore(store).rows_per_stream == need
    assert "serves the sweep" in sweep("store", path).stdout  # built once
    result = sweep("run", path)
    assert result.returncode == 0, result.stdout + result.stderr
    done = rows(tmp_path / "sweep")
    assert len(done) == 4 and all(float(r["epochs_caption"]) > 0 for r in done)
    for r in done:  # each cell read the store: its counts are the store's (samples per source, no kinds or skips)
        cell = tmp_path / "sweep" / "cells" / r["key"]
        assert yaml.safe_load((cell / "cell.yaml").read_text())["data"]["rows"] == str(store)
        counts = json.loads((cell / "summary.json").read_text())["data_counts"]
        assert counts["samples"] > 0 and not any(k.startswith("kind/") for k in counts)
    longer = spec("longer.yaml", overrides={**overrides, "data": data}, tokens_per_param=[0.016])
    result = sweep("run", longer, "--out", tmp_path / "longer")
    assert result.returncode != 0 and f"holds {need} rows a stream" in result.stderr
    assert "building it again" in sweep("store", longer).stdout
    assert RowStore(store).rows_per_stream > need
    # two recipes that read one store with different data: refused before anything is built or removed
    mixed = spec("mixed.yaml", overrides={**overrides, "data": data}, recipes={"a": {}, "b": {"data": {"seed": 5}}})
    for command in ("store", "run"):
        result = sweep(command, mixed, "--out", tmp_path / "mixed")
        assert result.returncode != 0 and "2 different data sections" in result.stderr
        assert "Traceback" not in result.stderr
    assert RowStore(store).rows_per_stream > need


def test_the_plan_puts_a_sweeps_wall_time_on_its_slots():
    """scaling.plan.slot_wall: cells started as scaling.local starts them (trunks first, then the longest) on the
    first slot to free up; `python -m scaling plan` prints it for one GPU's cells_per_gpu slots."""
    from types import SimpleNamespace

    from scaling.plan import slot_wall

    def cells(*minutes, trunk=None):
        out = [SimpleNamespace(is_trunk=False, minutes=m) for m in minutes]
        return out + ([SimpleNamespace(is_trunk=True, minutes=trunk)] if trunk is not None else [])

    assert slot_wall(cells(3, 5, 3), 2) == 6  # 5 | 3 + 3 (shortest first would give 8, a plain mean 5.5)
    assert slot_wall(cells(3, 5, 3), 1) == 11 and slot_wall(cells(3, 5, 3), 4) == 5
    assert slot_wall(cells(5, 3, 3, trunk=1), 2) == 7  # the trunk first: 1 + 3 + 3 | 5, where longest-first gives 6
    spec = REPO / "configs" / "sweeps" / "study6.yaml"
    wall = slot_wall(plan(load_spec(spec)).cells, load_spec(spec).launcher.cells_per_gpu)
    printed = subprocess.run(
        [sys.executable, "-m", "scaling", "plan", str(spec)], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert f"about {wall:.0f} minutes on one GPU holding 8 at once" in printed
    assert f"(study6: about {wall:.0f} min of one GPU)" in (REPO / "README.md").read_text()
