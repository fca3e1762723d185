"""Running cells on this machine: one at a time or several at once on CPUs, or spread over a host's GPUs.

On a GPU host each cell gets `launcher.nproc` devices through CUDA_VISIBLE_DEVICES and its own rendezvous port;
cells start as devices free up, the costliest first, and `launcher.cells_per_gpu` lets tiny cells share a device.
A cell whose compiled shape another cell is compiling waits for that compile and then reads it from the cache
(`CompileGate`). A cell of one process runs on a warm worker that trains cell after cell (`Launches`,
scaling/worker.py), so it pays no interpreter start and no imports.
Cells (and workers) die with the driver (Linux's parent-death signal), so a killed sweep leaves no cell training on
its own; a cell launched through torchrun (nproc > 1) loses its torchrun that way but not its workers.

SIGTERM or SIGUSR1 to the driver (a time box's `timeout`, SLURM's warning signal) stops the sweep cleanly instead:
no cell starts, each running cell gets SIGTERM, finishes its step and checkpoints (train/signals.py), and the
driver exits with EXIT_REQUEUE once they are down; the next `run` resumes them where they stopped. Each cell runs
in a session of its own, so a signal to the driver's process group (coreutils' `timeout` signals the whole group,
as does Ctrl-C) reaches the driver alone and each cell gets it once, from the driver, in its trainer only. Signalled
with the group on an H200, 14 of 15 running study cells exited on SIGTERM (-15) without saving (docs/study/STUDY.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from scaling.plan import Cell, Plan
from scaling.results import finished, has_summary, record, recorded_keys
from scaling.spec import SweepSpec
from train.config import ConfigError
from train.rundir import FIRST_STEPS_FILE
from train.signals import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[1]


def visible_gpus() -> list[str]:
    """The devices this driver may hand out: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def device_slots(spec: SweepSpec) -> dict[str, int]:
    """Device -> cells it may hold at once; {} on a CPU host (or with launcher.gpus: [])."""
    launcher = spec.launcher
    visible = visible_gpus()
    if launcher.gpus is None:
        chosen = visible
    else:
        missing = [g for g in launcher.gpus if str(g) not in visible]
        if missing:
            raise ConfigError(
                f"launcher.gpus names device(s) {missing} that do not exist here (visible: {visible or 'none'})"
            )
        chosen = [str(g) for g in launcher.gpus]
    if chosen and len(chosen) < launcher.nproc:
        raise ConfigError(f"launcher.nproc={launcher.nproc} needs that many GPUs; {len(chosen)} are available")
    return {d: launcher.cells_per_gpu for d in chosen}


def take_devices(free: dict[str, int], n: int) -> list[str] | None:
    """n devices with room, the emptiest first (spreads cells before stacking them); None when none fit."""
    ready = sorted((d for d in free if free[d] > 0), key=lambda d: -free[d])
    if len(ready) < n:
        return None
    for d in ready[:n]:
        free[d] -= 1
    return ready[:n]


def compile_shape(cell: Cell) -> str | None:
    """What a cell's compiled graphs depend on (the model, the engine's settings, the micro-batch's shape), or None
    when it compiles nothing. The image mask is not part of it: the model reads it as data, so a study's two
    recipes share their compiles. Cells that agree share inductor's on-disk cache: on an H200 a study cell whose shape
    was compiled before started in 6-10 s of first steps, one compiling it afresh in 40-120 s (docs/study/STUDY.md)."""
    cfg = cell.config
    engine = cfg.get("deepspeed") or {}
    if not engine.get("compile"):
        return None
    data = cfg.get("data") or {}
    batch = {k: data.get(k) for k in ("seq_len", "batch_size", "patch_size", "max_image_patches")}
    model = dict(cfg.get("model") or {})
    if _mask_is_data(model):
        model.pop("image_mask", None)  # data in the graph (FusionTransformer.bidirectional_images), not code
    return json.dumps({"model": model, "engine": engine, "batch": batch}, sort_keys=True)


def _mask_is_data(model: dict) -> bool:
    """Whether both image masks run the same attention kernel here (model.attention.resolve_backend: flash-attn,
    where `auto` finds it, serves causal masks only), so that the mask is only data in the compiled graph."""
    import torch

    from model.attention import resolve_backend
    from model.config import IMAGE_MASKS, ModelConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kernels = {resolve_backend(ModelConfig.from_dict({**model, "image_mask": m}), device) for m in IMAGE_MASKS}
    except ConfigError:  # a kernel that serves one mask only
        return False
    return len(kernels) == 1


class CompileGate:
    """One cell of a shape compiles at a time: another cell of that shape waits until the first has finished its
    first steps (the trainer's FIRST_STEPS_FILE, written after them), and from then on every cell of the shape
    starts freely and loads the graphs from the cache instead of compiling them again beside it. A first cell that
    stops before its first steps are done hands the compile to the next one. Cells of other shapes start meanwhile;
    a slot stays free only when every cell left waits on a compile (`launcher.stagger_compiles: false`: no gate)."""

    def __init__(self, on: bool = True):
        self.on = on
        self.warming: dict[str, tuple[Cell, float]] = {}  # shape -> the cell compiling it, and when it started
        self.compiled: set[str] = set()

    def started(self, cell: Cell, at: float) -> None:
        shape = compile_shape(cell)
        if self.on and shape is not None and shape not in self.compiled and shape not in self.warming:
            self.warming[shape] = (cell, at)

    def settle(self, running: set[str]) -> None:
        """Move the shapes whose compiling cell is past its first steps (in this process) to compiled; let go of
        those whose compiling cell stopped short of them."""
        for shape, (cell, at) in list(self.warming.items()):
            marker = cell.run_dir / FIRST_STEPS_FILE
            if marker.exists() and marker.stat().st_mtime >= at:
                self.compiled.add(shape)
            elif cell.key in running:
                continue
            del self.warming[shape]

    def blocked(self, cell: Cell) -> bool:
        return self.on and compile_shape(cell) in self.warming


def command(cell: Cell, nproc: int, port: int) -> list[str]:
    train = [str(REPO / "train.py"), "--config", str(cell.config_path)]
    if nproc == 1:  # one process: no launcher; MASTER_PORT set by the driver for its process group
        return [sys.executable, *train]
    launch = ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
    return [sys.executable, *launch, f"--master_port={port}", *train]


def free_port(taken: set[int]) -> int:
    """A port free now and not handed to a running cell (whose process may not have bound it yet)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


class ColdCell:
    """A cell in a process of its own (`train.py`, under torchrun when it takes several)."""

    def __init__(self, cell: Cell, nproc: int, port: int, env: dict, log: Path):
        self.log = open(log, "a")  # noqa: SIM115 - closed when the process ends
        self.proc = subprocess.Popen(
            command(cell, nproc, port),
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_driver if sys.platform == "linux" else None,
            start_new_session=True,  # a signal to the driver's group (`timeout`, Ctrl-C) is the driver's to pass on
        )

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def terminate(self) -> None:
        self.proc.terminate()


class WarmWorker:
    """A `scaling.worker` process bound to its devices, and the cell it trains now: `poll` reads the worker's answer
    when there is one, or the worker's own exit status when it died mid-cell (killed by a signal, say)."""

    def __init__(self, devices: tuple[str, ...], env: dict, log_dir: Path):
        self.devices = devices
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scaling.worker", "--log", str(log_dir.parent / "workers.log")],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=_die_with_driver if sys.platform == "linux" else None,
            start_new_session=True,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.pending = b""
        self.returncode: int | None = None

    def give(self, config: Path, env: dict, log: Path) -> None:
        self.returncode = None
        line = json.dumps({"config": str(config), "env": env, "log": str(log)}) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            chunk = None
        self.pending += chunk or b""
        if b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            self.returncode = json.loads(line)["code"]
        elif chunk == b"" or self.proc.poll() is not None:  # gone without an answer
            self.returncode = self.proc.wait() or 1
        return self.returncode

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the trainer's handler: finish the step, save, answer EXIT_REQUEUE

    @property
    def idle(self) -> bool:
        return self.returncode == 0 and self.proc.poll() is None


class Launches:
    """How cells start: in a process each (ColdCell), or, with `launcher.warm_workers` and one process a cell, on
    warm workers, one a slot, that train cell after cell (scaling.worker) and are reused once their cell finished."""

    def __init__(self, env: dict, log_dir: Path, warm: bool):
        self.env, self.log_dir, self.warm = env, log_dir, warm
        self.idle: list[WarmWorker] = []
        self.workers: list[WarmWorker] = []

    def start(self, cell: Cell, nproc: int, port: int, devices: list[str], launched: float):
        """devices: what the cell gets through CUDA_VISIBLE_DEVICES ([] on a CPU host)."""
        cell_env = {"MASTER_PORT": str(port), "FUSION_LAUNCH_TIME": repr(launched)}
        if devices:
            cell_env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        log = self.log_dir / f"{cell.key}.log"
        if not self.warm:
            return ColdCell(cell, nproc, port, {**self.env, **cell_env}, log)
        worker = next((w for w in self.idle if w.devices == tuple(devices)), None)
        if worker is None:
            bound = {"CUDA_VISIBLE_DEVICES": cell_env["CUDA_VISIBLE_DEVICES"]} if devices else {}
            worker = WarmWorker(tuple(devices), {**self.env, **bound}, self.log_dir)  # the rest comes per cell
            self.workers.append(worker)
        else:
            self.idle.remove(worker)
        worker.give(cell.config_path, cell_env, log)
        return worker

    def ended(self, handle) -> None:
        if isinstance(handle, ColdCell):
            handle.log.close()
        elif handle.idle:
            self.idle.append(handle)

    def close(self, grace_s: float = 30.0) -> None:
        """End of input to every worker: an idle one exits at once; one still in a cell (the driver stopped on an
        error) is killed after grace_s, all of them together."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


def _die_with_driver() -> None:
    """Runs in a cell's process before it starts (Linux): the kernel kills the cell when the driver dies."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def run_local(spec: SweepSpec, p: Plan, slots: dict[str, int], launch_for: float | None = None) -> None:
    """slots: `device_slots(spec)`, asked for before anything starts (a device that does not exist is refused).
    launch_for: seconds after which no cell starts; the running ones finish, the rest wait for the next run."""
    deadline = None if launch_for is None else time.monotonic() + launch_for
    for c in p.cells:
        if has_summary(c) and not c.is_trunk:
            record(spec.out, c, spec.flops_convention)
    recorded = recorded_keys(spec.out)
    todo = [c for c in p.cells if not finished(c, recorded)]
    needed = {c.trunk for c in todo if c.trunk}  # a trunk runs only for branches still to train
    todo = [c for c in todo if not c.is_trunk or c.key in needed]
    todo.sort(key=lambda c: (not c.is_trunk, -c.minutes))  # trunks first, then the longest cells
    where = f"{len(slots)} GPU(s), {spec.launcher.cells_per_gpu} cell(s) each" if slots else "CPU"
    print(f"{len(p.cells) - len(todo)} of {len(p.cells)} cells already finished; running {len(todo)} on {where}")
    run_id = _span(spec.out, start=time.time(), slots=sum(slots.values()) or spec.launcher.parallel, gpus=len(slots))
    running: dict = {}
    log_dir = Path(spec.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    warm = spec.launcher.warm_workers and spec.launcher.nproc == 1
    launches = Launches(env, log_dir, warm)
    free = dict(slots)
    stop: list[str] = []  # the signal that asked the sweep to stop
    handlers = {sig: signal.signal(sig, lambda n, f: stop.append(signal.Signals(n).name)) for sig in STOP_SIGNALS}
    failed: list[str] = []
    try:
        saved, lost = _loop(spec, todo, running, free, slots, launches, deadline, launch_for, stop, failed, run_id)
    finally:
        launches.close()
        for sig, old in handlers.items():
            signal.signal(sig, old)
        _span(spec.out, run=run_id, end=time.time())
    if stop:
        if failed:
            print(f"{len(failed)} cell(s) failed: {', '.join(failed)} (logs in {log_dir})", flush=True)
        print(
            f"stopped by {stop[0]}: {saved + lost} cell(s) interrupted ({saved} checkpointed at their step, {lost} "
            f"stopped without saving: they resume from their last periodic checkpoint), {len(todo)} not started; "
            "run again to go on",
            flush=True,
        )
        raise SystemExit(EXIT_REQUEUE)
    if failed:
        raise RuntimeError(
            f"{len(failed)} cell(s) failed: {', '.join(failed)} (logs in {log_dir}); the other cells ran. A failed "
            "cell is not finished: the next run tries it again"
        )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
HEARTBEAT_S = 30.0  # how often a running driver writes `seen` to OUT/driver.jsonl


def _span(out: str, **fields) -> str:
    """One line of OUT/driver.jsonl, the driver's own time (`python -m scaling time` reads it): a run's start (and
    its cell slots), a `seen` at each cell it starts or reaps and every HEARTBEAT_S, later its end. A killed driver
    writes no end: its last `seen` dates it to within HEARTBEAT_S."""
    fields.setdefault("run", f"{os.getpid()}-{time.time():.6f}")
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "driver.jsonl", "a") as f:
        f.write(json.dumps(fields) + "\n")
    return fields["run"]


def _loop(spec, todo, running, free, slots, launches, deadline, launch_for, stop, failed, run_id) -> tuple[int, int]:
    """Launch and reap cells until all are done, the time box closes, or a stop signal has brought them down;
    returns how many interrupted cells saved their step (exit EXIT_REQUEUE) and how many did not. A cell that fails
    goes into `failed` and the sweep goes on without it."""
    nproc, saved, lost, stopping = spec.launcher.nproc, 0, 0, False
    gate = CompileGate(spec.launcher.stagger_compiles)
    beat = time.monotonic()
    while todo or running:
        if time.monotonic() - beat > HEARTBEAT_S:
            _span(spec.out, run=run_id, seen=time.time())
            beat = time.monotonic()
        if stop and not stopping:
            stopping = True
            for proc, *_ in running.values():
                proc.terminate()  # SIGTERM: the cell finishes its step, checkpoints and exits with EXIT_REQUEUE
        for key, (proc, cell, devices, _) in list(running.items()):
            if proc.poll() is None:
                continue
            launches.ended(proc)
            del running[key]
            beat = -HEARTBEAT_S  # a cell ended: say so at the top of the next pass
            for d in devices:
                free[d] += 1
            if proc.returncode and has_summary(cell):  # a signal caught it on its way out, its summary written
                print(f"{key} exited {proc.returncode} after writing its summary: finished", flush=True)
            elif proc.returncode and (stopping or proc.returncode == EXIT_REQUEUE):
                # asked to stop (by us, or by a signal of its own): it resumes on the next run
                saved, lost = (saved + 1, lost) if proc.returncode == EXIT_REQUEUE else (saved, lost + 1)
                print(f"interrupted {key} (exit {proc.returncode}); it resumes on the next run", flush=True)
                continue
            elif proc.returncode:  # the others go on (they would die with the driver); the run ends in error
                failed.append(key)
                print(f"FAILED {key} (exit {proc.returncode}); see {launches.log_dir / key}.log", flush=True)
                continue
            if not cell.is_trunk:
                record(spec.out, cell, spec.flops_convention)
            print(f"finished {key} ({cell.recipe}, size {cell.size}, {cell.budget})", flush=True)
        if stopping:
            if not running:
                return saved, lost
            time.sleep(0.5)
            continue
        closed = deadline is not None and time.monotonic() > deadline
        if closed and todo and not running:
            print(f"--launch-for {launch_for:g} s passed: {len(todo)} cell(s) not started; run again to go on")
            return saved, lost
        ready = [c for c in todo if not c.trunk or (Path(spec.out) / "cells" / c.trunk / "summary.json").exists()]
        if closed:
            ready = []
        gate.settle(set(running))
        for cell in ready:
            if gate.blocked(cell):
                continue
            if slots:
                devices = take_devices(free, nproc)
                if devices is None:
                    break
            elif len(running) >= spec.launcher.parallel:
                break
            else:
                devices = []
            todo.remove(cell)
            cell.write_config()
            port = free_port({r[3] for r in running.values()})
            launched = time.time()
            proc = launches.start(cell, nproc, port, devices, launched)
            running[cell.key] = (proc, cell, devices, port)
            gate.started(cell, launched)
            beat = -HEARTBEAT_S
        time.sleep(0.5)
    return saved, lost
