"""The trainer end to end on CPU: torchrun with 2 processes under ZeRO-2 and ZeRO-3 (gloo), resume equality,
a save killed with SIGKILL, SIGUSR1 preemption, config errors, the NaN guard, export and the schedules."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from train.config import ConfigError, ScheduleConfig, load_config
from train.schedule import lr_at
from train.signals import EXIT_REQUEUE

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, run_dir: Path, *overrides, nproc: int = 2, env: dict | None = None, wait: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "train.py",
        "--config",
        str(config),
        f"run_dir={run_dir}",
        *overrides,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run logs the replayed steps again)."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def samples_by_step(run_dir: Path) -> dict[tuple, list]:
    out = {}
    for rank in (0, 1):
        for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out[(rank, rec["step"], rec["micro"])] = rec["rows"]
    return out


@pytest.fixture(scope="module")
def zero2_run(micro_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("zero2") / "run"
    result = launch(micro_config, run, "deepspeed.zero_stage=2", "export.hf=true")  # exported when it ends
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_zero2_trains_logs_and_summarises(zero2_run):
    logged = [m for m in metrics(zero2_run) if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, 13))
    for key in (
        "step",
        "loss",
        "text_loss",
        "image_loss",
        "z_loss",
        "lr",
        "tokens_per_s",
        "mfu",
        "grad_norm",
        "memory_gb",
        "tokens",
        "flops",
        "skipped_steps",
    ):
        assert key in logged[0], key
    assert logged[0]["mfu"] is None  # no peak is known for a CPU: not reported rather than invented
    assert all(m["max_attn_logit"] > 0 and m["logit_norm"] > 0 for m in logged if m["step"] % 4 == 0)
    assert not any("logit_norm" in m for m in logged if m["step"] % 4)  # telemetry costs nothing on other steps
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5
    summary = json.loads((zero2_run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 2 * 2 * 64
    assert summary["final_train_loss"] == logged[-1]["loss"]
    assert logged[-1]["tokens"] == summary["tokens"] and logged[-1]["flops"] == summary["flops"]  # cumulative
    assert summary["params"] > summary["params_non_embedding"] > 0
    assert summary["flops"] == pytest.approx(summary["flops_per_token"] * summary["tokens"])
    assert set(summary["final_val"]) >= {"caption/text_loss", "caption_heldout/text_loss", "text_loss"}
    val = summary["final_val"]  # bits per byte: nats over ln 2, over more bytes than targets (pieces span bytes)
    assert 0 < val["bits_per_byte"] < val["text_loss"] / math.log(2) and val["caption/bits_per_byte"] > 0
    assert math.isfinite(summary["val_text_loss"])
    resolved = yaml.safe_load((zero2_run / "config.yaml").read_text())
    assert resolved["model"]["d_model"] == 128 and resolved["deepspeed"]["zero_stage"] == 2
    ckpts = sorted(p.name for p in (zero2_run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000008", "step_00000012"]  # keep=2
    assert (zero2_run / "checkpoints" / "latest").read_text() == "step_00000012"
    assert any((zero2_run / "tensorboard").iterdir())
    # `export.hf: true`: the final checkpoint (two ZeRO-2 ranks' shards) as a transformers folder, the same model
    import transformers

    from model import load_pretrained

    hf = transformers.AutoModelForCausalLM.from_pretrained(zero2_run / "hf", trust_remote_code=True).eval()
    tokens = torch.randint(7, 1024, (1, 16))
    with torch.no_grad():
        theirs, ours = hf(tokens).logits, load_pretrained(zero2_run).eval()(tokens, return_logits=True).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", [3, 0])
def test_other_zero_stages_compute_what_zero2_computes(zero2_run, micro_config, tmp_path, stage):
    """Same seed, same data: ZeRO-3 partitions differently, ZeRO-0 clips in train.step instead of DeepSpeed; both
    log the same losses and gradient norms (clipping engaged: norms above grad_clip) and export the same weights."""
    from model import load_pretrained
    from train.export import export

    run = tmp_path / f"zero{stage}"
    result = launch(micro_config, run, f"deepspeed.zero_stage={stage}", "logging.peak_tflops=0.001")
    assert result.returncode == 0, result.stdout + result.stderr
    logged = [m for m in metrics(run) if "loss" in m]
    summary = json.loads((run / "summary.json").read_text())
    for m in logged:  # with a peak given: MFU by the formula, and at most that with the head counted where it ran
        assert m["mfu"] == pytest.approx(summary["flops_per_token"] * m["tokens_per_s"] / (2 * 1e9))
        assert 0 < m["mfu_run"] <= m["mfu"]
    assert any(m["mfu_run"] < m["mfu"] for m in logged)  # image positions have no text target: the head skips them
    a, b = losses_by_step(zero2_run), losses_by_step(run)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4)
    norms = [(x["grad_norm"], y["grad_norm"]) for x, y in zip(metrics(zero2_run), metrics(run)) if "grad_norm" in x]
    assert max(x for x, _ in norms) > 1.0  # the micro config clips at 1.0
    for x, y in norms:
        assert y == pytest.approx(x, rel=1e-3)
    m2, m3 = load_pretrained(export(zero2_run)), load_pretrained(export(run))
    for (name, p2), (_, p3) in zip(m2.state_dict().items(), m3.state_dict().items()):
        torch.testing.assert_close(p2, p3, atol=2e-4, rtol=1e-3, msg=name)


def test_kill_during_save_then_resume_matches_uninterrupted(zero2_run, micro_config, tmp_path):
    """SIGKILL inside the step-8 save: `latest` stays on step 4; `resume=auto` continues from there and logs the
    same loss at every step, on the same samples in the same order, as the run that was never interrupted."""
    run = tmp_path / "killed"
    result = launch(micro_config, run, env={"FUSION_TEST_KILL_DURING_SAVE": "8"})
    assert result.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (ckpts / "step_00000008").exists() and not (ckpts / "step_00000008" / "COMPLETE").exists()
    result = launch(micro_config, run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "step_00000004" in result.stdout
    assert losses_by_step(run) == losses_by_step(zero2_run)  # bitwise: CPU runs are reproducible step for step
    assert samples_by_step(run) == samples_by_step(zero2_run)
    assert not (ckpts / "step_00000008").exists() or (ckpts / "step_00000008" / "COMPLETE").exists()


def test_sigusr1_checkpoints_and_exits_for_requeue(micro_config, tmp_path):
    run = tmp_path / "preempted"
    proc = launch(micro_config, run, "steps=400", "checkpoint.every=0", "eval.every=0", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(metrics(run)) >= 3:
            break
        time.sleep(0.5)
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    stopped = int((run / "PREEMPTED").read_text())
    assert 3 <= stopped < 400, out
    assert f"exiting {EXIT_REQUEUE}" in out
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    result = launch(micro_config, run, "steps=" + str(stopped + 2), "checkpoint.every=0", "eval.every=0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == stopped + 2
    assert not (run / "PREEMPTED").exists()


def logged_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_nan_guard_skips_and_then_stops(micro_config, tmp_path):
    """Also through the captured step's code (deepspeed.cuda_graph, uncaptured on a CPU: fixed-shape batches, LR and
    target weights as tensors): the same losses, the same skip."""
    args = ("steps=6", "nan.inject_steps=[2]", "eval.every=0", "deepspeed.grad_accum=2", "logging.telemetry_every=0")
    losses = []
    for graph in ("false", "true"):
        run = tmp_path / f"nan-{graph}"
        result = launch(micro_config, run, *args, f"deepspeed.cuda_graph={graph}", nproc=1)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 1
        losses.append(logged_losses(run))
    assert len(losses[0]) == 6 and losses[0][2] is None and losses[1][2] is None  # a skipped step logs no loss
    del losses[0][2], losses[1][2]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=0), losses
    result = launch(
        micro_config, tmp_path / "nan2", "steps=8", "nan.inject_steps=[2,3,4]", "nan.max_consecutive=3", nproc=1
    )
    assert result.returncode != 0
    assert "3 consecutive steps had a NaN/Inf loss (last at step 4)" in result.stdout + result.stderr


def test_nan_on_one_rank_skips_the_step_on_every_rank(micro_config, tmp_path):
    """The skip flag is agreed across ranks on the device: had rank 0 stepped with the NaN gradients averaged in
    from rank 1, its weights and every later loss would be NaN. ZeRO-0 hands the step straight to the torch
    optimizer, so nothing but train.step's flag can skip it (in fp32 ZeRO-1/2/3 DeepSpeed's norm check also would)."""
    runs = {}
    for name, ranks in (("rank1", "[1]"), ("all", "[]")):
        run = tmp_path / name
        result = launch(
            micro_config,
            run,
            "steps=5",
            "deepspeed.zero_stage=0",
            "nan.inject_steps=[2]",
            f"nan.inject_ranks={ranks}",
            "eval.every=0",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 1
        runs[name] = losses_by_step(run)
    assert all(math.isfinite(v) for v in runs["rank1"].values() if v is not None)
    assert runs["rank1"][5] == pytest.approx(runs["all"][5], rel=1e-6)


def test_config_errors_stop_before_any_work(micro_config):
    for override, message in [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
        ("model.n_layer=3", "unknown option 'model.n_layer' for ModelConfig (did you mean 'n_layers'?)"),
        ("deepspeed.zero_stage=two", "'deepspeed.zero_stage' must be int, got 'two'"),
        ("data.patch_size=16", "data.patch_size=16 != model.patch_size=8"),
    ]:
        t0 = time.time()
        result = subprocess.run(
            [sys.executable, "train.py", "--config", str(micro_config), override],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr, (override, result.stderr)
        assert time.time() - t0 < 20  # refused at parse time, not after starting DeepSpeed
    with pytest.raises(ConfigError, match="did you mean 'sources'"):
        load_config(micro_config, ["data.source=[]"])
    with pytest.raises(ConfigError, match=r"logging.profile must be \[first, last\) steps"):
        load_config(micro_config, ["logging.profile=[5,3]"])
    with pytest.raises(ConfigError, match="export.hf_text: norm_order='post'"):
        load_config(micro_config, ["model.norm_order=post", "export.hf_text=true"])  # before training, not after
    with pytest.raises(ConfigError, match="compile_scope='graph' is not blocks or model"):
        load_config(micro_config, ["deepspeed.compile_scope=graph"])
    for other in ("deepspeed.zero_stage=3", "deepspeed.activation_checkpointing=true"):
        with pytest.raises(ConfigError, match="compile_scope=model is not built for ZeRO-3"):
            load_config(micro_config, ["deepspeed.compile_scope=model", other])
    with pytest.raises(ConfigError, match="deepspeed.cuda_graph captures the whole step itself"):
        load_config(micro_config, ["deepspeed.cuda_graph=true", "deepspeed.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match="logging.telemetry_every .a forward that differs on its steps"):
        load_config(micro_config, ["deepspeed.cuda_graph=true", "logging.telemetry_every=4"])
    assert load_config(micro_config, ['steps="8"']).steps == 8  # a whole number as a string, like "3e-3" for floats
    two = launch(micro_config, Path("/tmp/unused-run"), "optim.lrr=1")  # two ranks: the error is printed once
    assert two.returncode != 0 and (two.stdout + two.stderr).count("config error: unknown config key") == 1


def test_unwritable_run_dir_fails_fast(micro_config, tmp_path):
    blocked = tmp_path / "ro"
    blocked.write_text("a file, not a directory")
    result = launch(micro_config, blocked / "run", nproc=1)
    assert result.returncode != 0 and "is not writable" in result.stdout + result.stderr


def test_schedules():
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, 1.0, cos) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, cooldown_fraction=0.2, min_lr_ratio=0.0)
    lrs = [lr_at(s, 100, 1.0, wsd) for s in range(100)]
    assert all(v == 1.0 for v in lrs[10:80]) and lrs[-1] == pytest.approx(0.0)
    assert lrs[84] == pytest.approx(1 - math.sqrt(5 / 20))  # 1-sqrt cooldown
    # The stable phase does not depend on the run length, so cooldowns can branch from stable checkpoints.
    assert [lr_at(s, 200, 1.0, wsd) for s in range(80)] == lrs[:80]
    const = ScheduleConfig(kind="constant", warmup_steps=0)
    assert {lr_at(s, 50, 0.5, const) for s in range(50)} == {0.5}


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_regions_compute_what_eager_computes(tiny_cfg, scope):
    """apply_compile (blocks + the output loss region, or the whole forward) changes speed, not the function or its
    gradients, also for batches whose counts of image patches and text targets differ, as a packed batch's do from
    step to step: the second batch compiles nothing (those counts are symbolic from the first call, not compiled as
    constants and then compiled again); the whole forward's evaluation (no gradients) runs eagerly and gives the
    same loss."""
    from conftest import packed_batch

    from model import build_model
    from train.engine import apply_compile

    batches = [packed_batch(seed=3, rows=2), packed_batch(seed=4, n_docs=30, rows=2)]
    for name in ("target_index", "patches"):
        assert len(batches[0][name]) != len(batches[1][name])
    torch.manual_seed(0)
    eager, compiled = build_model(tiny_cfg), build_model(tiny_cfg)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.utils.counters.clear()
    apply_compile(compiled, scope=scope)
    graphs = []
    for batch in batches:
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(**batch)
            out.loss.backward()
            losses.append(out.loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0]  # one compile serves both batches
    if scope == "model":  # one graph: neither the input check (a value read back) nor the loss kernel breaks it
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        torch._dynamo.utils.counters.clear()
        with torch.no_grad():
            torch.testing.assert_close(compiled(**batches[0]).loss, eager(**batches[0]).loss, atol=1e-5, rtol=1e-5)
        assert not torch._dynamo.utils.counters["frames"]  # nothing traced, nothing compiled without gradients


def test_the_two_image_masks_are_one_compiled_graph(tiny_cfg, monkeypatch, tmp_path):
    """The image mask is data in the model (a flag tensor), not a branch: the causal model's whole-forward compile,
    traced afresh, is found in inductor's cache where the bidirectional model's put it (a sweep's two recipes share
    their compiles), and each still computes its own mask (the losses differ, each equal to its eager model's)."""
    import dataclasses

    from conftest import packed_batch

    from model import build_model
    from train.engine import apply_compile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold cache
    batch = packed_batch(seed=3, rows=2)
    assert len(batch["patches"])
    losses, counts = {}, []
    for mask in ("bidirectional", "causal"):
        torch.manual_seed(0)
        eager = build_model(dataclasses.replace(tiny_cfg, image_mask=mask))
        compiled = build_model(dataclasses.replace(tiny_cfg, image_mask=mask))
        compiled.load_state_dict(eager.state_dict())
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        apply_compile(compiled, scope="model")
        got = compiled(**batch).loss
        got.backward()
        torch.testing.assert_close(got, eager(**batch).loss, atol=1e-5, rtol=1e-5)
        losses[mask] = got.item()
        counts.append(dict(torch._dynamo.utils.counters["inductor"]))
    assert losses["bidirectional"] != losses["causal"]
    assert counts[0].get("fxgraph_cache_miss", 0) > 0 and not counts[0].get("fxgraph_cache_hit")
    assert counts[1].get("fxgraph_cache_hit", 0) > 0 and not counts[1].get("fxgraph_cache_miss"), counts


def test_host_threads_drop_to_one_on_a_gpu_unless_told(monkeypatch):
    """train.engine.quiet_host_threads: one intra-op thread for a GPU trainer (a pool per core competed with the
    loader's workers), nothing on a CPU run, and OMP_NUM_THREADS, when set, wins."""
    from train.engine import quiet_host_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        quiet_host_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        quiet_host_threads(torch.device("cuda"))
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        quiet_host_threads(torch.device("cuda"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_zero_step_clips_on_the_device_as_deepspeed_does():
    """train.zero_waits' clipping: a norm above the limit scales gradients by limit / norm, one below leaves them,
    and an invalid norm (DeepSpeed's -1 sentinel, inf or NaN) zeroes them, as DeepSpeed's own branch does; the
    sentinel fill matches DeepSpeed's helper. The engine-level check is the ZeRO-0 vs ZeRO-2 test above."""
    from types import SimpleNamespace

    from deepspeed.runtime import utils as ds_utils

    from train import zero_waits

    opt = SimpleNamespace(clip_grad=1.0, loss_scale=1.0)
    for norm, factor in [(4.0, 0.25), (0.5, 1.0), (-1.0, 0.0), (float("inf"), 0.0), (float("nan"), 0.0)]:
        grads = [torch.ones(3), [torch.ones(2), torch.ones(1)]]
        zero_waits._unscale_and_clip_grads(opt, grads, torch.tensor(norm))
        for g in [grads[0], *grads[1]]:
            torch.testing.assert_close(g, torch.full_like(g, factor), atol=1e-6, rtol=1e-5, msg=str(norm))
    for value in [2.0, float("inf"), float("nan")]:
        ours, theirs = torch.tensor(value), torch.tensor(value)
        zero_waits._mask_nan_or_inf(ours)
        ds_utils.mask_nan_or_inf_with_val_inplace(theirs, device="cpu")
        assert torch.equal(ours, theirs)
    assert zero_waits.apply()  # DeepSpeed's code still has the shape the patch expects


def test_engine_keeps_torch_mlp_under_zero3_and_checkpointing(micro_config, monkeypatch, tiny_cfg):
    """QuACK's fused MLP reads its weights outside its layers' forward (where ZeRO-3 gathers them) and doubled the
    peak memory under activation checkpointing: the engine keeps torch's kernels there, and only there. A module
    marked fused still runs torch's ops on a CPU tensor."""
    from model import build_model, mlp
    from train.engine import choose_mlp_kernels

    monkeypatch.setattr(mlp, "fused_available", lambda: True)  # as on a Hopper GPU with QuACK installed
    monkeypatch.setattr(mlp, "MIN_WIDTH", 0)
    for overrides, fused in [
        ([], True),
        (["deepspeed.zero_stage=3"], False),
        (["deepspeed.activation_checkpointing=true"], False),
    ]:
        cfg = load_config(micro_config, overrides)
        model = build_model(cfg.model)
        choose_mlp_kernels(model, cfg)
        assert [b.mlp.fused for b in model.blocks] == [fused] * cfg.model.n_layers, overrides
    layer = mlp.MLP(tiny_cfg.d_model, 64)
    assert layer.fused
    x = torch.randn(3, tiny_cfg.d_model)
    gate, up = layer.w_gate_up(x).chunk(2, dim=-1)
    torch.testing.assert_close(layer(x), layer.w_down(torch.nn.functional.silu(gate) * up))


@pytest.fixture(scope="module")
def torch_engine_run(micro_config, tmp_path_factory):
    """One process: `deepspeed.engine=auto` trains on train.engine.TorchEngine, two micro-batches a step."""
    run = tmp_path_factory.mktemp("torch_engine") / "run"
    result = launch(micro_config, run, "deepspeed.grad_accum=2", nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_torch_engine_computes_what_deepspeed_computes(torch_engine_run, micro_config, tmp_path):
    """The one-process engine against DeepSpeed's (ZeRO-0, forced) on the same seed and data: the same losses, the
    same gradient norms (both clip in train.step), the same exported weights; and its checkpoint holds no
    DeepSpeed file layout, so a DeepSpeed resume of it is refused with the reason."""
    from model import load_pretrained
    from train.export import export

    run = tmp_path / "deepspeed"
    result = launch(
        micro_config, run, "deepspeed.grad_accum=2", "deepspeed.engine=deepspeed", "deepspeed.zero_stage=0", nproc=1
    )
    assert result.returncode == 0, result.stdout + result.stderr
    a, b = losses_by_step(run), losses_by_step(torch_engine_run)
    assert a.keys() == b.keys() and len(a) == 12
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4)
    norms = [
        (x["grad_norm"], y["grad_norm"]) for x, y in zip(metrics(run), metrics(torch_engine_run)) if "grad_norm" in x
    ]
    assert norms and max(x for x, _ in norms) > 1.0
    for x, y in norms:
        assert y == pytest.approx(x, rel=1e-3)
    m_ds, m_torch = load_pretrained(export(run)), load_pretrained(export(torch_engine_run))
    assert (run / "export" / "tokenizer.model").read_bytes() == Path(
        yaml.safe_load(micro_config.read_text())["data"]["tokenizer"]
    ).read_bytes()  # the export carries the tokenizer its ids mean something under
    assert load_pretrained(run).cfg == m_ds.cfg  # a run directory loads its export
    for (name, p), (_, q) in zip(m_ds.state_dict().items(), m_torch.state_dict().items()):
        torch.testing.assert_close(q, p, atol=2e-4, rtol=1e-3, msg=name)
    latest = torch_engine_run / "checkpoints" / (torch_engine_run / "checkpoints" / "latest").read_text()
    result = launch(micro_config, tmp_path / "two", f"resume={latest}", "deepspeed.grad_accum=2")
    assert result.returncode != 0 and "written by the one-process torch engine" in result.stdout + result.stderr
    with pytest.raises(FileNotFoundError, match="python -m train.export"):
        load_pretrained(tmp_path / "two")  # a run directory never exported: says what to run


def test_torch_engine_resumes_a_killed_run_exactly(torch_engine_run, micro_config, tmp_path):
    """SIGKILL inside the step-8 save, then `resume=auto`: the same losses and samples, bitwise, as the run that was
    never interrupted (model, optimizer, accumulation count, data and RNG states all restored)."""
    run = tmp_path / "killed"
    env = {"FUSION_TEST_KILL_DURING_SAVE": "8"}
    result = launch(micro_config, run, "deepspeed.grad_accum=2", nproc=1, env=env)
    assert result.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    result = launch(micro_config, run, "deepspeed.grad_accum=2", nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout
    assert losses_by_step(run) == losses_by_step(torch_engine_run)
    logged = [m["step"] for m in metrics(run) if "loss" in m]
    assert logged == list(range(1, 13))  # the lost segment's lines (steps 5-8) gave way to the replayed ones
    rows = [json.loads(line)["rows"] for line in (run / "samples_rank0.jsonl").read_text().splitlines()]
    uninterrupted = [
        json.loads(line)["rows"] for line in (torch_engine_run / "samples_rank0.jsonl").read_text().splitlines()
    ]
    assert rows[-16:] == uninterrupted[-16:]


def test_tokenizer_larger_than_the_model_vocabulary_is_a_config_error(micro_config):
    """Checked when the config loads, naming both sizes (it used to fail at the first batch, 86 s in); a model far
    larger than its tokenizer is only warned about."""
    with pytest.raises(ConfigError, match=r"has 1024 pieces but model.vocab_size=512"):
        load_config(micro_config, ["model.vocab_size=512"])
    with pytest.warns(UserWarning, match="over twice the tokenizer's 1024 pieces"):
        load_config(micro_config, ["model.vocab_size=4096"])


def test_a_step_weighs_every_text_target_the_same(micro_config):
    """Two micro-batches with different numbers of text targets, through TrainStep and the one-process engine with
    `target_weights`: the gradient is that of one batch holding both (each target weighs the same), not the mean
    of the two micro-batches' means, which the unweighted step gave."""
    import numpy as np
    from conftest import tiny_model_config

    from data.layout import SpecialIds, layout_document
    from data.packing import Packer, collate
    from model import IGNORE, build_model
    from train.engine import TorchEngine
    from train.step import TrainStep, target_weights

    torch.manual_seed(0)
    mc = tiny_model_config(n_heads=2, max_seq_len=32)
    special = SpecialIds(pad=0, bos=2, eos=3, img_start=4, img_end=5, row_sep=6, patch=7)
    rng = np.random.default_rng(0)
    rows = []
    for length in (30, 5, 3, 4):  # a row full of targets, then rows of one short document and padding each
        packer = Packer(32, special.pad, 3 * 4 * 4)
        rows += packer.add(layout_document([rng.integers(16, 64, length).tolist()], special, 4, "mrope"))
        rows += packer.flush()
    a, b, both = collate(rows[:1]), collate(rows[1:4]), collate(rows[:4])
    counts = [int((x["targets"] != IGNORE).sum()) for x in (a, b)]
    assert counts[0] > 2 * counts[1] > 0
    reference = build_model(mc)

    def fresh():
        model = build_model(mc)
        model.load_state_dict(reference.state_dict())
        return model

    model = fresh()
    out = model(**both)
    (out.text_loss + out.z_loss).backward()
    whole = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def stepped(weights):
        model = fresh()
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
        seen = []  # the gradients the optimizer is handed at the accumulation boundary
        opt.step = lambda: seen.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        engine = TorchEngine(model, opt, load_config(micro_config, ["deepspeed.grad_accum=2"]), torch.device("cpu"))
        TrainStep(engine, opt, torch.device("cpu"))([a, b], 0, weights=weights)
        return seen[0]

    for w, g in zip(stepped(target_weights(counts)), whole, strict=True):
        torch.testing.assert_close(w, g, atol=1e-6, rtol=1e-4)
    unweighted = stepped(())
    assert max(float((u - g).abs().max()) for u, g in zip(unweighted, whole, strict=True)) > 1e-4


def test_a_build_lock_left_by_a_killed_start_is_cleared(tmp_path, monkeypatch, capsys):
    """DeepSpeed's CPU op builds under torch's FileBaton, which waits forever on a lock whose builder was killed:
    an old lock is removed with a warning naming it; a fresh one is left and named, even beside a finished build
    (every process loading the op takes it for a moment: removing it broke a two-rank start)."""
    from train.engine import clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    assert clear_stale_build_lock() is None and lock.exists()
    assert f"waiting for {lock}" in capsys.readouterr().out
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with pytest.warns(UserWarning, match="removed .*lock, left by a build that was killed"):
        assert clear_stale_build_lock() == lock
    assert not lock.exists()
    lock.write_text("")
    (lock.parent / "deepspeed_shm_comm.so").write_bytes(b"")
    assert clear_stale_build_lock() is None and lock.exists()  # built: a fresh lock is a loader's version check


def test_the_demo_on_a_run_of_other_data_says_what_it_needs(torch_engine_run, tmp_path):
    """train.demo scores the embedded dataset's held-out scenes; a run trained elsewhere gets that said, not a
    ZeroDivisionError."""
    import shutil

    from train.demo import run_demo

    run = tmp_path / "run"
    shutil.copytree(torch_engine_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (tmp_path / "other").mkdir()
    shutil.copyfile(config["data"]["tokenizer"], tmp_path / "other" / "tokenizer.model")
    config["data"]["tokenizer"] = str(tmp_path / "other" / "tokenizer.model")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="found none there"), pytest.warns(UserWarning):
        run_demo(run, n_show=1, n_score=2)


def _weights_on_rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from train.step import target_weights

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    counts = [[10, 2], [4, 0]][rank]
    Path(out, f"{rank}.json").write_text(json.dumps(target_weights(counts)))
    dist.destroy_process_group()


def test_target_weights_count_every_rank(tmp_path):
    """Two ranks over gloo: the weights use the targets of the whole step (16), so that with DeepSpeed's mean over
    ranks and over micro-batches every target of the step counts once: n x G x world / N."""
    import torch.multiprocessing as mp

    mp.spawn(_weights_on_rank, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    assert json.loads((tmp_path / "0.json").read_text()) == [2.5, 0.5]
    assert json.loads((tmp_path / "1.json").read_text()) == [1.0, 0.0]


def test_the_captured_index_grows_when_a_batch_outgrows_it(micro_config, monkeypatch):
    """The captured step's target index has room for the counts seen so far (train.graphed_step.index_room); a batch
    with more targets gets larger buffers (and, on a GPU, a new capture) instead of losing targets: the losses stay
    the eager step's. Uncaptured on a CPU, the same buffers and the same growth."""
    from data.handoff import to_device
    from data.pipeline import StreamingLoader
    from train import graphed_step
    from train.engine import build_engine
    from train.graphed_step import GraphedStep
    from train.step import TrainStep

    monkeypatch.setattr(graphed_step, "HEADROOM", 1.0)
    monkeypatch.setattr(graphed_step, "ROUND", 1)  # room for exactly the first batch's targets
    cfg = load_config(micro_config, ["logging.telemetry_every=0"])
    runs, rooms = [], []
    for kind in (TrainStep, GraphedStep):
        torch.manual_seed(0)
        engine, opt, model = build_engine(cfg, torch.device("cpu"), 1)
        step = kind(engine, opt, torch.device("cpu"))
        loader = StreamingLoader(cfg.data, 0, 1)
        losses = []
        for i in range(8):
            batch = to_device(next(loader), torch.device("cpu"))
            losses.append(float(step([batch], i).text_loss))
            rooms.append(step.head_rows([batch]))
        runs.append(losses)
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)
    counts, room = rooms[:8], rooms[8:]
    assert room[0] == counts[0] and room == sorted(room) and room[-1] >= max(counts) and len(set(room)) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA device")
def test_a_captured_step_trains_as_the_eager_one(micro_config):
    """On a GPU the step is captured after its warm-up and replayed: the LR the schedule fills in, the target
    weights of two micro-batches and a NaN step reach the replays (a float captured once would not change), and the
    losses and the weights follow the eager step's."""
    from data.handoff import to_device
    from data.pipeline import StreamingLoader
    from model import IGNORE
    from train.engine import build_engine, step_clip
    from train.graphed_step import GraphedStep
    from train.schedule import set_lr
    from train.step import TrainStep, target_weights

    overrides = ["deepspeed.grad_accum=2", "deepspeed.compile=true", "deepspeed.compile_scope=model"]
    cfg = load_config(micro_config, overrides + ["logging.telemetry_every=0"])
    dev = torch.device("cuda")
    runs = []
    for kind in (TrainStep, GraphedStep):
        torch.manual_seed(0)
        engine, opt, model = build_engine(cfg, dev, 1)
        step = kind(engine, opt, dev, clip=step_clip(cfg, "torch"))
        loader = StreamingLoader(cfg.data, 0, 1)
        losses = []
        for i in range(10):
            set_lr(opt, 3e-3 * (1 + i % 3))
            batches = [next(loader) for _ in range(2)]
            weights = target_weights([int((b["targets"] != IGNORE).sum()) for b in batches])
            out = step([to_device(b, dev) for b in batches], i, inject_nan=i == 6, weights=weights)
            losses.append(float(out.text_loss))
            model.check_inputs = False
        runs.append((losses, step.take(), [p.detach().clone() for p in model.parameters()]))
        torch._dynamo.reset()
    (eager, eager_window, eager_params), (graphed, window, params) = runs
    assert isinstance(step.graph, torch.cuda.CUDAGraph)  # captured, and replayed for the last steps
    assert graphed == pytest.approx(eager, rel=2e-3)
    assert (window["skipped"], window["last_bad"]) == (eager_window["skipped"], eager_window["last_bad"]) == (1, 6)
    for p, q in zip(params, eager_params, strict=True):
        torch.testing.assert_close(p, q, atol=2e-3, rtol=2e-2)
