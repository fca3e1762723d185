"""The training loop: one code path for GPUs (NCCL) and CPUs (gloo), launched by torchrun or srun.

Per step: LR from the schedule, `grad_accum` micro-batches through the DeepSpeed engine and the optimizer step
(train/step.py: the NaN/Inf guard runs on the device, so the loop adds no wait for the GPU); metrics every
`logging.every` steps (the only host sync of the loop, which also raises on too many skipped steps in a row);
validation every `eval.every`; checkpoints every `checkpoint.every`, at the end, and on signals.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data.handoff import to_device
from data.pipeline import StreamingLoader, source_samples
from model import IGNORE, flops_per_token, param_count
from train.checkpoint import Checkpointer
from train.config import TrainConfig, to_dict
from train.engine import build_engine, engine_kind, quiet_host_threads, step_clip
from train.evaluate import validate
from train.export import at_end as export_at_end
from train.fingerprint import fingerprint
from train.metrics import MetricsWriter, memory_gb, peak_flops
from train.profile import StepProfiler
from train.rundir import RunLock, ensure_run_dir
from train.schedule import lr_at
from train.signals import EXIT_REQUEUE, SignalFlags
from train.step import LOSSES, TrainStep, target_weights
from train.task_eval import TaskEval


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a NaN or Inf loss."""


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(EXIT_REQUEUE)


def setup_distributed() -> tuple[int, int, torch.device]:
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun, or from srun's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID."""
    for ours, slurm in (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"), ("LOCAL_RANK", "SLURM_LOCALID")):
        if ours not in os.environ and slurm in os.environ:
            os.environ[ours] = os.environ[slurm]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    cuda = torch.cuda.is_available()
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
        quiet_host_threads(torch.device("cuda", local))
    # torch's own rendezvous: DeepSpeed's engine finds the group made here, and a one-process run on the torch
    # engine never imports DeepSpeed (seconds of every sweep cell's start-up). A one-process world needs no port: an
    # in-process store, since eight sweep cells starting at once on one host raced each other's compile workers for
    # the ports their drivers had found free (EADDRINUSE on an H200, docs/study/STUDY.md).
    backend = "nccl" if cuda else "gloo"
    if os.environ["WORLD_SIZE"] == "1":
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend=backend)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def prepare_run_dir(cfg: TrainConfig, rank: int) -> tuple[Path, RunLock | None]:
    """Rank 0 takes the directory's lock (a second trainer on it stops here, naming the holder) and writes the
    resolved config."""
    run, lock = Path(cfg.run_dir), None
    if rank == 0:
        ensure_run_dir(run)
        lock = RunLock(run)
        lock.acquire()
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    return run, lock


def host_group():
    """A gloo group for the per-step agreement on signals: a CPU collective that never waits on the GPU (over
    NCCL, reading the result back would stall the host every step). CPU runs use the default (gloo) group."""
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None


def _any_rank(flags: list[bool], group) -> list[bool]:
    """Each flag OR-ed over ranks, in one collective, so every rank stops or saves at the same step."""
    t = torch.tensor([int(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def launch_time(default: float | None) -> float:
    """When this run's processes were launched: the launcher's FUSION_LAUNCH_TIME (the sweep driver and
    slurm/train.sbatch set it), else `default` (train.py's first line), else now."""
    value = os.environ.get("FUSION_LAUNCH_TIME")
    return float(value) if value else default or time.time()


def data_epochs(counts: dict, sizes: dict, world: int) -> dict:
    """Epochs of each training source the run read: this rank's samples read times the ranks (the streams split
    every source evenly), over the source's samples; a source without a manifest is left out."""
    return {name: counts.get(f"source/{name}", 0) * world / n for name, n in sizes.items() if n}


def train(cfg: TrainConfig, launched_at: float | None = None) -> dict:
    launched = launch_time(launched_at)
    rank, world, device = setup_distributed()
    run, lock = prepare_run_dir(cfg, rank)
    torch.manual_seed(cfg.seed)
    engine, optimizer, model = build_engine(cfg, device, world)
    ckpt = Checkpointer(run / "checkpoints", cfg.checkpoint.keep, rank, fingerprint(cfg, world), cfg.resume_allow)
    # train_s: the loop (evaluations and checkpoints included); startup_s: launch to the first step; wall_s: launch
    # to the summary. Each summed over the run's segments (a resumed run adds to its checkpoint's).
    state = {"step": 0, "tokens": 0, "flops": 0.0, "flops_6n": 0.0, "skipped_steps": 0}
    state.update(train_s=0.0, startup_s=0.0, wall_s=0.0)
    data_state = None
    loaded = None
    if cfg.resume == "auto":  # the newest checkpoint that loads (a truncated one is passed over, with a warning)
        loaded = ckpt.load_newest_good(engine)
    elif cfg.resume != "none":  # an explicit checkpoint: loads, or fails loudly
        loaded = (Path(cfg.resume), *ckpt.load(engine, cfg.resume))
    if loaded is None and cfg.init_from:
        loaded = (Path(cfg.init_from), *ckpt.load(engine, cfg.init_from))
    if loaded:
        source, client, rank_state = loaded
        state.update(client["train"])
        data_state = rank_state["data"]
        if rank == 0:
            print(f"resumed from {source} at step {state['step']}", flush=True)
    loader = StreamingLoader(cfg.data, rank, world, data_state, pin_memory=device.type == "cuda")
    signals = SignalFlags()

    mc, G, B, T = cfg.model, cfg.deepspeed.grad_accum, cfg.data.batch_size, cfg.data.seq_len
    tokens_per_step = world * G * B * T
    fpt, fpt_6n = flops_per_token(mc, T), flops_per_token(mc, T, attention=False)
    peak = peak_flops(device, cfg.deepspeed.bf16 or cfg.deepspeed.autocast, cfg.logging.peak_tflops)
    metrics = (
        MetricsWriter(run, cfg.steps, state["step"], cfg.logging.tensorboard, cfg.logging.progress)
        if rank == 0
        else None
    )
    inject, inject_ranks = set(cfg.nan.inject_steps), set(cfg.nan.inject_ranks or range(world))
    sample_log = open(run / f"samples_rank{rank}.jsonl", "a") if cfg.logging.sample_log else None  # noqa: SIM115

    def save():
        client = {"train": dict(state), "config": to_dict(cfg)}
        return ckpt.save(engine, state["step"], client, {"data": loader.state_dict()})

    if rank == 0:  # one block at the start: what runs, where, on what, from where
        start = f"step {state['step']}, from {loaded[0]}" if loaded else "step 0 (a new run)"
        sources = ", ".join(f"{x.name} {x.weight:g}" for x in cfg.data.sources)
        print(
            f"run_dir {run}\n"
            f"model   {param_count(mc) / 1e6:.2f}M parameters ({param_count(mc, embeddings=False) / 1e6:.2f}M "
            f"without embeddings), depth {mc.n_layers}, width {mc.d_model}\n"
            f"batch   {tokens_per_step:,} tokens a step ({world} rank(s) x {G} micro-batch(es) x {B} rows x {T}), "
            f"{cfg.steps} steps\n"
            f"data    {sources}\n"
            f"engine  {engine_kind(cfg, world)}, {device.type}\n"
            f"start   {start}",
            flush=True,
        )
    task_eval = TaskEval(cfg, rank, world)
    run_step = TrainStep(engine, optimizer, device, clip=step_clip(cfg, engine_kind(cfg, world)))
    profiler = StepProfiler(cfg.logging.profile, run, device, rank)
    signal_group = host_group()
    window_steps, window_t0, last_val = 0, time.perf_counter(), {}
    head_rows = 0  # positions the output head ran at this window, this rank (target_index's length, from its shape)
    last_loss = None  # the latest logged training loss, for the summary
    state["startup_s"] += time.time() - launched
    wall_before = state["wall_s"] + (time.time() - launched)  # this segment's start-up counts as wall time
    run_t0 = time.perf_counter() - state["train_s"]
    wall_t0 = time.perf_counter() - wall_before
    if rank == 0:
        (run / "PREEMPTED").unlink(missing_ok=True)
    engine.train()
    try:
        while state["step"] < cfg.steps:
            step = state["step"]
            profiler.before(step)
            lr = lr_at(step, cfg.steps, cfg.optim.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            log_now = (step + 1) % cfg.logging.every == 0 or step + 1 == cfg.steps
            telemetry = log_now and cfg.logging.telemetry_every and (step + 1) % cfg.logging.telemetry_every == 0
            model.track_attention_logits(bool(telemetry))
            batches, counts = [], []
            for micro in range(G):
                cpu_batch = next(loader)
                counts.append(int((cpu_batch["targets"] != IGNORE).sum()))  # on the host: no wait for the GPU
                batches.append(to_device(cpu_batch, device))  # one copy (data.handoff)
                head_rows += len(batches[-1]["target_index"]) if "target_index" in batches[-1] else B * T
                if sample_log:  # flushed per line: the log must survive the crash it may be needed to explain
                    sample_log.write(json.dumps({"step": step, "micro": micro, "rows": loader.last_pieces}) + "\n")
                    sample_log.flush()
            weights = target_weights(counts, signal_group)
            first = run_step(batches, step, inject_nan=step in inject and rank in inject_ranks, weights=weights)
            model.track_attention_logits(False)
            model.check_inputs = False  # the first step proved the data fits the model; spare a sync per forward
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["flops"] += fpt * tokens_per_step
            state["flops_6n"] += fpt_6n * tokens_per_step
            window_steps += 1
            metrics and metrics.advance()
            profiler.after(step)

            if log_now:  # the only host sync of a training step, every logging.every steps
                window = run_step.take()
                state["skipped_steps"] += window["skipped"]
                if window["max_streak"] >= cfg.nan.max_consecutive:
                    raise NonFiniteLoss(
                        f"{window['max_streak']} consecutive steps had a NaN/Inf loss (last at step "
                        f"{window['last_bad']}); stopping. Lower optim.lr, check the data with `python -m "
                        f"data.check`, or resume from an earlier checkpoint."
                    )
                dt = time.perf_counter() - window_t0
                tps = window_steps * tokens_per_step / dt
                grad_norm = run_step.grad_norm()
                fpt_run = flops_per_token(mc, T, head_share=head_rows / (window_steps * G * B * T))  # "MFU run"
                record = {
                    **{k: window[k] for k in LOSSES},
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "lr": lr,
                    "tokens_per_s": tps,
                    "mfu": fpt * tps / (peak * world) if peak else None,
                    "mfu_run": fpt_run * tps / (peak * world) if peak else None,
                    "tokens": state["tokens"],
                    "flops": state["flops"],
                    "memory_gb": memory_gb(device),
                    "skipped_steps": state["skipped_steps"],
                }
                if telemetry:
                    record["max_attn_logit"] = float(model.max_attention_logit())
                    record["logit_norm"] = float(first.logit_norm)
                last_loss = record["loss"]
                if rank == 0:
                    metrics.log(state["step"], record)
                    lock.refresh()
                window_steps, window_t0, head_rows = 0, time.perf_counter(), 0

            if cfg.eval.every and state["step"] % cfg.eval.every == 0 and state["step"] < cfg.steps:
                eval_t0 = time.perf_counter()
                last_val = validate(engine, cfg.data, cfg.eval.max_batches, device, rank, world)
                if rank == 0 and last_val:
                    metrics.log(state["step"], last_val, prefix="val/")
                scores = task_eval(model)
                if scores:
                    metrics.log(state["step"], scores)
                window_t0 += time.perf_counter() - eval_t0  # tokens/s counts training time only

            stop, save_now = _any_rank([signals.stop, signals.save], signal_group)
            state["train_s"], state["wall_s"] = time.perf_counter() - run_t0, time.perf_counter() - wall_t0
            periodic = (cfg.checkpoint.every and state["step"] % cfg.checkpoint.every == 0) or (
                state["step"] in cfg.checkpoint.at_steps
            )
            if stop or periodic or save_now:
                save()
                signals.save = False
            if stop:
                if rank == 0:  # a marker for launchers that do not pass the exit status through (torchrun)
                    (run / "PREEMPTED").write_text(f"{state['step']}\n")
                    received = ", ".join(signals.received)
                    print(f"received {received}: saved step {state['step']}, exiting {EXIT_REQUEUE}", flush=True)
                dist.barrier()  # no rank exits (and gets the others killed by srun) before the marker exists
                raise Preempted()

        last_val = validate(engine, cfg.data, cfg.eval.max_batches, device, rank, world)
        final_tasks = task_eval(model)
        state["train_s"] = time.perf_counter() - run_t0
        if not ckpt.latest() or ckpt.latest().name != f"step_{state['step']:08d}":
            save()
        summary = {
            "steps": state["step"],
            "tokens": state["tokens"],
            "flops": state["flops"],
            "flops_6n": state["flops_6n"],
            "params": param_count(mc),
            "params_non_embedding": param_count(mc, embeddings=False),
            "flops_per_token": fpt,
            "flops_per_token_6n": fpt_6n,
            "final_train_loss": last_loss,
            "final_val": last_val,
            "val_text_loss": last_val.get("text_loss"),
            "skipped_steps": state["skipped_steps"],
            "wall_s": time.perf_counter() - wall_t0,
            "train_s": state["train_s"],
            "startup_s": state["startup_s"],
            "world_size": world,
            # where it ran, as the launcher gave it (a sweep's cells: which devices and rendezvous port)
            "launch": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "MASTER_PORT", "SLURM_JOB_ID")},
            "launched_at": launched,  # this segment's launch and end, epoch seconds
            "ended_at": time.time(),
            "final_tasks": final_tasks,
            "data_counts": loader.skip_counts(),
            "data_epochs": data_epochs(loader.skip_counts(), source_samples(cfg.data), world),
        }
        if rank == 0:
            metrics.log(state["step"], last_val, prefix="val/")
            if final_tasks:
                metrics.log(state["step"], final_tasks)
            (run / "summary.json").write_text(json.dumps(summary, indent=1))
        if cfg.export.hf or cfg.export.hf_text:
            dist.barrier()  # every rank's shard of the final checkpoint is on disk before rank 0 reads them
            if rank == 0:
                for path in export_at_end(run, cfg.export.hf, cfg.export.hf_text):
                    print(f"exported {path}", flush=True)
        return summary
    finally:
        if lock:
            lock.release()
        if metrics:
            metrics.close()
        if sample_log:
            sample_log.close()
