"""Step metrics to stdout (a progress bar when interactive, plain lines otherwise), metrics.jsonl and TensorBoard;
MFU from the model's FLOP count and a table of dense peak throughput per accelerator and dtype."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s by device-name fragment and dtype, from the vendors' datasheets.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},  # SXM; the PCIe part is lower (756)
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp32": 31.2},
}


def peak_flops(device: torch.device, bf16: bool, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU): MFU is then not reported rather than invented."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return (756.0 if bf16 else 51.0) * 1e12
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table["bf16" if bf16 else "fp32"] * 1e12
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def drop_after(path: Path, step: int) -> None:
    """A resumed run replays the steps after its checkpoint: their lines from the lost segment go (rewritten
    atomically), so the file stays one curve, each step logged once."""
    if not path.exists():
        return
    if step == 0:  # a fresh start (resume=none) in a used directory: the earlier run's curve is kept aside
        if path.stat().st_size:
            path.rename(path.with_name(f"metrics.before-{int(time.time())}.jsonl"))
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line cut by a crash: drop it with the segment it ended
        return math.inf


class MetricsWriter:
    """Rank 0's sink. Every logged step is one JSON line; the same scalars go to TensorBoard."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, progress: str):
        self.total, self.start_step, self.t0 = total_steps, start_step, time.time()
        path = run_dir / "metrics.jsonl"
        drop_after(path, start_step)
        self.file = open(path, "a")  # noqa: SIM115 - open for the run's lifetime
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        bar = progress == "bar" or (progress == "auto" and sys.stdout.isatty())
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

    def log(self, step: int, values: dict, prefix: str = "") -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        record = {"step": step, **{prefix + k: v for k, v in clean.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)
        short = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if (k in _SHOWN or prefix) and k != "step")
        if self.bar is not None:
            self.bar.set_postfix_str(short, refresh=False)
        else:  # a file or a pipe (SLURM logs): where the run is and when it should end, on every line
            print(f"step {step}/{self.total} {self._eta(step)} {short}", flush=True)

    def _eta(self, step: int) -> str:
        """Remaining time at this segment's pace so far: (elapsed / steps done) x steps left."""
        done = step - self.start_step
        if done <= 0 or step >= self.total:
            return "eta -"
        left = (time.time() - self.t0) / done * (self.total - step)
        return f"eta {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


_SHOWN = ("step", "loss", "text_loss", "image_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped_steps")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
