"""Runs that never lose work: pruning by save order, a truncated checkpoint passed over, a full disk, the run
directory's lock, and one curve in metrics.jsonl after a resume. Real trainers (torchrun), real checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_train import launch, losses_by_step, metrics

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def one_proc_run(micro_config, tmp_path_factory):
    """12 steps on the one-process engine: checkpoints at 4, 8, 12; 8 and 12 kept; steps 5 and 6 profiled."""
    run = tmp_path_factory.mktemp("runs") / "run"
    result = launch(micro_config, run, "logging.profile=[5,7]", nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_a_profiled_window_writes_its_report_and_trace(one_proc_run):
    """logging.profile=[5,7]: the report names the two steps and their time, and ranks ops that ran in them; the
    Chrome trace is JSON with events."""
    report = (one_proc_run / "profile.txt").read_text()
    head = report.splitlines()[0]
    assert head.startswith("steps 5-6: ") and float(head.split(": ")[1].split(" ms")[0]) > 0
    assert "aten::" in report and "Self CPU" in report
    trace = json.loads((one_proc_run / "profile.json").read_text())
    assert len(trace["traceEvents"]) > 10


def test_a_fresh_start_in_a_used_directory_keeps_what_it_writes(one_proc_run, micro_config, tmp_path):
    """resume=none in a directory holding steps 8 and 12 of an earlier run: its own step 4 is `latest` and stays
    (pruning by step number deleted it), and resume=auto continues from it; the earlier curve is kept aside."""
    run = tmp_path / "run"
    shutil.copytree(one_proc_run, run)
    result = launch(micro_config, run, "resume=none", "steps=4", nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004" and (ckpts / "step_00000004" / "COMPLETE").exists()
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4]
    assert len(list(run.glob("metrics.before-*.jsonl"))) == 1
    result = launch(micro_config, run, "steps=6", nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step_00000004 at step 4" in result.stdout


def test_resume_passes_over_a_truncated_checkpoint(one_proc_run, micro_config, tmp_path):
    """A file of the newest checkpoint cut short: resume=auto warns naming it and resumes from the one before, and
    replays the same losses; an explicit resume of the bad one fails."""
    run = tmp_path / "run"
    shutil.copytree(one_proc_run, run)
    bad = run / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    (run / "summary.json").unlink()
    explicit = launch(micro_config, tmp_path / "other", f"resume={bad.parent}", nproc=1)
    assert explicit.returncode != 0 and f"{bad} does not load" in explicit.stdout + explicit.stderr  # no fallback
    result = launch(micro_config, run, nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert str(bad) in out and "resuming from" in out and "step_00000008 at step 8" in out
    assert losses_by_step(run) == losses_by_step(one_proc_run)


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_a_full_disk_stops_the_save_cleanly(one_proc_run, micro_config, tmp_path):
    """A run directory on a tmpfs with room for one checkpoint: the second save fails with "no space left on
    device" and the path, its partial directory is removed, and `latest` stays on the first."""
    size = sum(f.stat().st_size for f in (one_proc_run / "checkpoints" / "step_00000012").iterdir())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(size * 1.6) + (256 << 10)):
        pytest.skip("mounting a tmpfs needs root: the full-disk path was not exercised on this machine")
    try:
        run = disk / "run"
        result = launch(micro_config, run, "logging.sample_log=false", "logging.tensorboard=false", nproc=1)
        out = result.stdout + result.stderr
        assert result.returncode != 0
        assert "no space left on device" in out and str(run / "checkpoints" / "step_00000008") in out
        ckpts = run / "checkpoints"
        assert (ckpts / "latest").read_text() == "step_00000004"
        assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004"]
    finally:
        subprocess.run(["umount", str(disk)])


def test_one_trainer_per_run_directory(micro_config, tmp_path):
    """A second trainer on a directory in use is refused with the holder's host and PID; once the holder is
    killed (no release), the next trainer takes the stale lock over and trains."""
    run = tmp_path / "run"
    first = launch(micro_config, run, "steps=100000", nproc=1, wait=False)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.5)
        holder = json.loads((run / "LOCK").read_text())
        second = launch(micro_config, run, "steps=2", nproc=1)
        out = second.stdout + second.stderr
        assert second.returncode != 0
        assert f"in use by PID {holder['pid']} on {holder['host']}" in out
    finally:
        for p in [first.pid, *_children(first.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        first.wait()
    assert (run / "LOCK").exists()  # killed: nothing released it
    third = launch(micro_config, run, "steps=2", "resume=none", nproc=1)
    assert third.returncode == 0, third.stdout + third.stderr
    assert not (run / "LOCK").exists()  # released at the end


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in _children(k)]


def test_sigterm_to_torchrun_saves_and_marks_the_run_preempted(micro_config, tmp_path):
    """What `timeout`, `kill` or Ctrl-C do: signal torchrun, which signals each rank's process group. The rank
    finishes its step, checkpoints there and writes PREEMPTED; its DataLoader workers are not killed under it."""
    run = tmp_path / "run"
    proc = launch(micro_config, run, "steps=100000", "checkpoint.every=1000", nproc=1, wait=False)
    deadline = time.time() + 180
    while time.time() < deadline and len(metrics(run) if (run / "metrics.jsonl").exists() else []) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "is killed by signal" not in out, out
    step = int((run / "PREEMPTED").read_text())
    assert step >= 3 and (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert f"received SIGTERM: saved step {step}, exiting 75" in out


def test_resume_checks_what_it_resumes(one_proc_run, micro_config, tmp_path):
    """A changed seq_len or mixture stops the resume with the keys that differ, before any state is loaded; the
    mixture change goes through with resume_allow; reordered sources and a changed LR resume as they are."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(one_proc_run, run)
    cfg = yaml.safe_load(micro_config.read_text())
    first = cfg["data"]["sources"][0]["name"]
    result = launch(micro_config, run, "steps=14", "data.seq_len=32", nproc=1)
    assert result.returncode != 0 and "data.seq_len: 64 in the checkpoint, 32 now" in result.stdout + result.stderr
    heavier = [{**s, "weight": s["weight"] * (3 if i == 0 else 1)} for i, s in enumerate(cfg["data"]["sources"])]
    changed = f"data.sources={json.dumps(heavier)}"
    result = launch(micro_config, run, "steps=14", changed, nproc=1)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and f"data.sources.{first}.weight" in out and "resume_allow" in out
    result = launch(micro_config, run, "steps=14", changed, "resume_allow=[data.sources]", nproc=1)
    assert result.returncode == 0 and "step_00000012 at step 12" in result.stdout, result.stdout + result.stderr
    reordered = f"data.sources={json.dumps(heavier[::-1])}"  # the mixture step 14 was saved with, reordered
    result = launch(micro_config, run, "steps=16", reordered, "optim.lr=1e-3", nproc=1)
    assert result.returncode == 0 and "at step 14" in result.stdout, result.stdout + result.stderr


def test_a_save_reaches_the_disk_before_it_is_marked_complete(micro_config, tmp_path, monkeypatch):
    """The order a node crash needs: every file of the checkpoint and its directory fsynced, then COMPLETE written
    and fsynced, then the pointer's file fsynced, renamed, and the directory holding it fsynced. (A power cut cannot
    be staged here; the calls to fsync are recorded instead.)"""
    import torch

    from model import ModelConfig, build_model
    from train import checkpoint as ckpt_module
    from train.config import load_config
    from train.engine import TorchEngine

    synced: list[Path] = []
    real = ckpt_module._fsync
    monkeypatch.setattr(ckpt_module, "_fsync", lambda p: (synced.append(Path(p)), real(p)))
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=16))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    engine = TorchEngine(model, opt, load_config(micro_config), torch.device("cpu"))
    root = tmp_path / "checkpoints"
    path = ckpt_module.Checkpointer(root, 2, 0).save(engine, 3, {"train": {}}, {"data": {}})
    files = sorted(p for p in path.iterdir() if p.name != "COMPLETE")
    complete = synced.index(path / "COMPLETE")
    assert set(files) | {path} <= set(synced[:complete])
    assert synced[complete + 1 :] == [path, root / "latest.tmp", root]
    assert (root / "latest").read_text() == "step_00000003"
