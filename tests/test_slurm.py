"""The job scripts against a real one-node SLURM cluster (slurm/local-cluster.sh: munged, slurmctld, slurmd)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from scaling.cellfile import write_cells
from scaling.slurm import submit_array

pytestmark = pytest.mark.slurm
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "MAX_ARRAY_SIZE": "2"}  # small, so that a 3-cell sweep is submitted in two chunks
    start = subprocess.run(
        [str(REPO / "slurm" / "local-cluster.sh"), "start", str(state)], env=env, capture_output=True, text=True
    )
    assert start.returncode == 0, start.stdout + start.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run([str(REPO / "slurm" / "local-cluster.sh"), "stop", str(state)], capture_output=True)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def sbatch(*args: str, env: dict | None = None) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def jobs(jobid: str) -> list[dict]:
    """One record per job, or per task (and per pending range) of an array."""
    out = subprocess.run(["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait(jobid: str, timeout: float = 300) -> dict:
    """Until the job (every task of an array) has ended; returns the first record."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = jobs(jobid)
        if records and all(r.get("JobState") in TERMINAL for r in records):
            return records[0]
        time.sleep(1)
    raise TimeoutError(f"job {jobid} still {[r.get('JobState') for r in jobs(jobid)]} after {timeout}s")


def train_job(config: Path, log: Path, run: Path, *overrides: str, tasks: int = 2, env=None) -> str:
    return sbatch(
        f"--ntasks-per-node={tasks}",
        f"--output={log}",
        str(REPO / "slurm" / "train.sbatch"),
        str(config),
        f"run_dir={run}",
        *overrides,
        env=env,
    )


def final_loss(run: Path) -> float:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m][-1]


STEPS = ("steps=40", "checkpoint.every=0", "eval.every=0")


@pytest.fixture(scope="module")
def uninterrupted(cluster, micro_config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    jobid = train_job(micro_config, tmp / "log.out", tmp / "run", *STEPS)
    return jobid, tmp


def test_sbatch_trains_with_two_cpu_tasks(uninterrupted):
    jobid, tmp = uninterrupted
    info = wait(jobid)
    log = (tmp / "log.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 40
    assert "1 nodes x 2 tasks" in log


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(uninterrupted, micro_config, tmp_path):
    run = tmp_path / "run"
    jobid = train_job(micro_config, tmp_path / "log.out", run, *STEPS)
    deadline = time.time() + 240
    while time.time() < deadline:  # signal the batch shell mid-run, as --signal=B:USR1@T does near the limit
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jobid], check=True)
    info = wait(jobid, timeout=400)
    log = (tmp_path / "log.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "USR1 received" in log and "requeueing job" in log and "(restart 1)" in log
    stopped = int(re.search(r"checkpointed at step (\d+)", log).group(1))
    assert 3 <= stopped < 40 and f"resumed from {run}/checkpoints/step_{stopped:08d}" in log
    wait(uninterrupted[0])
    assert final_loss(run) == final_loss(uninterrupted[1] / "run")


def test_array_runs_three_configs_in_chunks(cluster, micro_config, tmp_path):
    cells = tmp_path / "cells.txt"
    variants = ["optim.betas=[0.9, 0.98]", "model.n_layers=1", "schedule.kind=constant"]  # a value with a space
    write_cells(
        cells,
        [
            [str(micro_config), f"run_dir={tmp_path}/cell{i}", "steps=4", "eval.every=0", v]
            for i, v in enumerate(variants)
        ],
    )
    submitted = submit_array(cells, max_concurrent=1, sbatch_args=["--ntasks=1", f"--output={tmp_path}/%A_%a.out"])
    assert [(offset, count) for _, offset, count in submitted] == [(0, 2), (2, 1)]  # MaxArraySize=2: two chunks
    for jobid, _, _ in submitted:
        wait(jobid)
        assert {r["JobState"] for r in jobs(jobid)} == {"COMPLETED"}
    resolved = [json.loads((tmp_path / f"cell{i}" / "summary.json").read_text()) for i in range(3)]
    assert all(r["steps"] == 4 for r in resolved)
    configs = [yaml.safe_load((tmp_path / f"cell{i}" / "config.yaml").read_text()) for i in range(3)]
    assert configs[0]["optim"]["betas"] == [0.9, 0.98]
    assert configs[1]["model"]["n_layers"] == 1 and configs[2]["schedule"]["kind"] == "constant"


def test_a_cells_file_edited_into_nonsense_fails_its_task_clearly(cluster, micro_config, tmp_path):
    cells = tmp_path / "cells.txt"
    cells.write_text(f"{micro_config} steps=4\n")  # the old space-separated format, or a hand edit
    jobid = sbatch(
        "--array=0",
        "--ntasks=1",
        f"--output={tmp_path}/%A_%a.out",
        f"--export=ALL,CELLS={cells}",
        str(REPO / "slurm" / "train.sbatch"),
    )
    assert wait(jobid)["JobState"] == "FAILED"
    log = next(tmp_path.glob("*_0.out")).read_text()
    assert "cells.txt:1: not a JSON array" in log and f"cannot read cell 0 of {cells}" in log


def sweep(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "scaling", *args], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_sweep_through_slurm_submits_once_and_records_every_row(cluster, micro_config, tmp_path):
    """Two recipes x two sizes, list values included, through the real cluster: a second `run` while tasks wait
    or run submits nothing; once they have ended, a final `run` records every row."""
    out = tmp_path / "sweep"
    spec = {
        "name": "slurm",
        "base": str(micro_config),
        "out": str(out),
        "sizes": [1, 2],
        "tokens_per_param": [0.004],
        "recipes": {
            "bidirectional": {"model": {"image_mask": "bidirectional"}},
            "causal": {"model": {"image_mask": "causal"}},
        },
        "overrides": {
            "eval": {"every": 0, "max_batches": 1},
            "checkpoint": {"every": 0, "at_steps": [1, 2]},  # a list, as WSD trunks carry
            "logging": {"every": 5, "tensorboard": False, "sample_log": False},
            "data": {"workers": 0, "seq_len": 32},
            "deepspeed": {"zero_stage": 0},
        },
        "hparams": {"batch_tokens_ref": 256, "rows_multiple": 4},
        "grid": {"sane_tokens_per_param": [0.001, 1000]},
        "launcher": {"kind": "slurm", "max_concurrent": 1, "sbatch_args": ["--ntasks=1"]},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = sweep("run", str(path))
    assert "0 queued or running, 4 submitted" in first.stdout, first.stdout  # in two arrays (MaxArraySize=2)
    submitted = json.loads((out / "slurm" / "jobs.json").read_text())
    assert len(submitted) == 4
    again = sweep("run", str(path))  # %1 per array: at least two tasks are still queued
    assert "0 submitted" in again.stdout and "submitted 2 cells" not in again.stdout, again.stdout
    assert json.loads((out / "slurm" / "jobs.json").read_text()) == submitted
    for jobid in {v.split("_")[0] for v in submitted.values()}:
        wait(jobid, timeout=400)
        assert {r["JobState"] for r in jobs(jobid)} == {"COMPLETED"}
    final = sweep("run", str(path))
    assert "all 4 cells finished (4 rows recorded now)" in final.stdout, final.stdout
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {r["recipe"] for r in table} == {"bidirectional", "causal"}
    for r in table:
        config = yaml.safe_load((out / "cells" / r["key"] / "config.yaml").read_text())
        assert config["optim"]["betas"] == [0.9, float(r["beta2"])] and config["checkpoint"]["at_steps"] == [1, 2]
        assert float(r["startup_s"]) > 0 and float(r["wall_s"]) > float(r["train_s"])
    assert "all 4 cells finished (0 rows recorded now)" in sweep("run", str(path)).stdout  # nothing twice


def test_failed_job_never_runs_its_dependent_and_fails_fast(cluster, micro_config, tmp_path):
    t0 = time.time()
    bad = train_job(tmp_path / "missing.yaml", tmp_path / "bad.out", tmp_path / "run")
    dependent = sbatch(
        "--ntasks=1",
        f"--dependency=afterok:{bad}",
        f"--output={tmp_path}/dep.out",
        "--wrap",
        f"touch {tmp_path}/dependent-ran",
    )
    assert wait(bad)["JobState"] == "FAILED"
    assert f"error: config {tmp_path}/missing.yaml not found" in (tmp_path / "bad.out").read_text()
    info = wait(dependent)
    assert info["JobState"] == "CANCELLED" and "Dependency" in info.get("Reason", ""), info
    assert not (tmp_path / "dependent-ran").exists()
    assert time.time() - t0 < 60


def test_bad_allocation_and_unwritable_run_dir_fail_fast(cluster, micro_config, tmp_path):
    nodes = train_job(micro_config, tmp_path / "nodes.out", tmp_path / "run", env={"NODES": "4"}, tasks=1)
    (tmp_path / "blocker").write_text("a file where a directory should be")
    unwritable = train_job(micro_config, tmp_path / "rw.out", tmp_path / "blocker" / "run", tasks=1)
    for jobid, out, message in [
        (nodes, "nodes.out", "the run expects NODES=4 but the allocation has 1 node(s)"),
        (unwritable, "rw.out", "is not writable"),
    ]:
        info = wait(jobid)
        assert info["JobState"] == "FAILED", info
        assert message in (tmp_path / out).read_text()
        assert info["RunTime"] < "00:00:30"
