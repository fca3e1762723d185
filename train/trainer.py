"""The training loop: one code path for GPUs (NCCL) and CPUs (gloo), launched by torchrun or srun, whatever the
objective (train/objective.py: next-token prediction for `lm` and `sft`, GRPO for `rl`).

The loop owns what every run shares: the processes, the run directory and its lock, the engine, the LR schedule,
checkpoints every `checkpoint.every`, at the end and on signals, resume, metrics, the start-up block, timing and the
summary. The objective owns its step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from train.checkpoint import Checkpointer
from train.config import TrainConfig, to_dict
from train.engine import build_engine, engine_kind, quiet_host_threads
from train.export import at_end as export_at_end
from train.fingerprint import fingerprint
from train.metrics import MetricsWriter
from train.objective import Objective
from train.rundir import FIRST_STEPS_FILE, RunLock, ensure_run_dir
from train.schedule import lr_at, set_lr
from train.signals import EXIT_REQUEUE, SignalFlags

# A process's first steps are timed apart (summary: first_steps_s): they hold its compile, which on a tiny sweep
# cell outlasts its start-up (scaling.gputime).
FIRST_STEPS = 5


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
    if dist.is_initialized():  # a warm worker's earlier cell made it (scaling.worker): the same one process
        pass
    elif os.environ["WORLD_SIZE"] == "1":
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


def objective_for(cfg: TrainConfig) -> type[Objective]:
    if cfg.objective == "rl":  # rollouts and a policy-gradient update instead of batches from the loader
        from train.rl import GRPO

        return GRPO
    from train.next_token import NextToken

    return NextToken


def train(cfg: TrainConfig, launched_at: float | None = None) -> dict:
    launched = launch_time(launched_at)
    # where this process's start-up went (summary `startup_phases`, a sweep's results.csv `startup_<phase>_s`):
    # launch: the launcher's spawn, the interpreter and the imports up to here; then each stage to the first step
    phases, mark = {"launch": time.time() - launched}, time.time()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.time()
        phases[name], mark = now - mark, now

    rank, world, device = setup_distributed()
    phase("distributed")
    kind = objective_for(cfg)
    cfg = kind.configure(cfg, world)
    run, lock = prepare_run_dir(cfg, rank)
    torch.manual_seed(cfg.seed)
    engine, optimizer, model = build_engine(cfg, device, world)
    phase("engine")
    ckpt = Checkpointer(run / "checkpoints", cfg.checkpoint.keep, rank, fingerprint(cfg, world), cfg.resume_allow)
    # train_s: the loop (evaluations and checkpoints included); startup_s: launch to the first step; wall_s: launch
    # to the summary. Each summed over the run's segments (a resumed run adds to its checkpoint's).
    state = {
        "step": 0,
        **kind.counters,
        "train_s": 0.0,
        "startup_s": 0.0,
        "wall_s": 0.0,
        "first_steps_s": 0.0,  # each process's first FIRST_STEPS steps, where its compile happens
        "first_steps": 0,
    }
    loaded = None
    if cfg.resume == "auto":  # the newest checkpoint that loads (a truncated one is passed over, with a warning)
        loaded = ckpt.load_newest_good(engine)
    elif cfg.resume != "none":  # an explicit checkpoint: loads, or fails loudly
        loaded = (Path(cfg.resume), *ckpt.load(engine, cfg.resume))
    if loaded is None and cfg.init_from:
        loaded = (Path(cfg.init_from), *ckpt.load(engine, cfg.init_from))
    if loaded:
        state.update(loaded[1]["train"])
        if rank == 0:
            print(f"resumed from {loaded[0]} at step {state['step']}", flush=True)
    phase("resume")
    group = host_group()
    objective = kind(cfg, run, engine, optimizer, model, device, rank, world, group, loaded[2] if loaded else None)
    phase("objective")  # the data loader (or the RL prompts and reference model)
    signals = SignalFlags()
    metrics = (
        MetricsWriter(run, cfg.steps, state["step"], cfg.logging.tensorboard, cfg.logging.progress)
        if rank == 0
        else None
    )

    def log(step: int, record: dict, prefix: str = "") -> None:
        if metrics:
            metrics.log(step, record, prefix=prefix)
            lock.refresh()

    def save():
        client = {"train": dict(state), "config": to_dict(cfg)}
        return ckpt.save(engine, state["step"], client, objective.rank_state())

    if rank == 0:  # one block at the start: what runs, where, on what, from where
        start = f"step {state['step']}, from {loaded[0]}" if loaded else "step 0 (a new run)"
        if not loaded and cfg.init_weights:
            start = f"step 0, from {cfg.init_weights}"
        print(
            f"run_dir {run}\n{objective.banner()}\nengine  {engine_kind(cfg, world)}, {device.type}\nstart   {start}",
            flush=True,
        )
    phase("rest")
    state["startup_s"] += time.time() - launched
    run_t0 = time.perf_counter() - state["train_s"]
    wall_t0 = time.perf_counter() - (state["wall_s"] + time.time() - launched)  # start-up counts as wall time
    if rank == 0:
        (run / "PREEMPTED").unlink(missing_ok=True)
    engine.train()
    timed, timed_s = 0, 0.0  # this process's steps timed apart, and their seconds
    try:
        while state["step"] < cfg.steps:
            lr = lr_at(state["step"], cfg.steps, cfg.optim.lr, cfg.schedule)
            set_lr(optimizer, lr)
            t_step = time.perf_counter()
            objective.step(state, lr, log)
            if timed < FIRST_STEPS:
                timed, took = timed + 1, time.perf_counter() - t_step
                timed_s += took
                state["first_steps_s"] += took
                state["first_steps"] += 1
                if timed == FIRST_STEPS and rank == 0:  # compiled: a sweep driver may start this shape's next cell
                    (run / FIRST_STEPS_FILE).write_text(json.dumps({"step": state["step"] + 1, "seconds": timed_s}))
            state["step"] += 1
            metrics and metrics.advance()
            stop, save_now = _any_rank([signals.stop, signals.save], group)
            state["train_s"], state["wall_s"] = time.perf_counter() - run_t0, time.perf_counter() - wall_t0
            periodic = (cfg.checkpoint.every and state["step"] % cfg.checkpoint.every == 0) or (
                state["step"] in cfg.checkpoint.at_steps
            )
            if stop or periodic or save_now:
                save()
                signals.save = False
            if stop and state["step"] < cfg.steps:  # at the last step it finishes instead
                if rank == 0:  # a marker for launchers that do not pass the exit status through (torchrun)
                    (run / "PREEMPTED").write_text(f"{state['step']}\n")
                    received = ", ".join(signals.received)
                    print(f"received {received}: saved step {state['step']}, exiting {EXIT_REQUEUE}", flush=True)
                dist.barrier()  # no rank exits (and gets the others killed by srun) before the marker exists
                raise Preempted()

        final = objective.finish(state, log)
        state["train_s"] = time.perf_counter() - run_t0
        if not ckpt.latest() or ckpt.latest().name != f"step_{state['step']:08d}":
            save()
        summary = {
            "steps": state["step"],
            **{k: state[k] for k in kind.counters},
            **final,
            "wall_s": time.perf_counter() - wall_t0,
            "train_s": state["train_s"],
            "startup_s": state["startup_s"],
            "first_steps_s": state["first_steps_s"],
            "first_steps": state["first_steps"],
            "startup_phases": {k: round(v, 3) for k, v in phases.items()},  # this process's, not summed over segments
            "world_size": world,
            # where it ran, as the launcher gave it (a sweep's cells: which devices and rendezvous port)
            "launch": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "MASTER_PORT", "SLURM_JOB_ID")},
            "pid": os.getpid(),  # a warm worker's cells share one (scaling.worker)
            # this process trained other cells before (a warm worker's): no interpreter start, no imports
            "warm_start": int(os.environ.get("FUSION_WORKER_CELLS", "0")) > 0,
            "launched_at": launched,  # this segment's launch and end, epoch seconds
            "ended_at": time.time(),
        }
        if rank == 0:
            (run / "summary.json").write_text(json.dumps(summary, indent=1))
        if cfg.export.hf or cfg.export.hf_text:
            dist.barrier()  # every rank's shard of the final checkpoint is on disk before rank 0 reads them
            if rank == 0:
                for path in export_at_end(run, cfg.export.hf, cfg.export.hf_text):
                    print(f"exported {path}", flush=True)
        return summary
    finally:
        objective.close()
        if lock:
            lock.release()
        if metrics:
            metrics.close()
