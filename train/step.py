"""One optimizer step that adds no wait for the GPU of its own.

A step runs `grad_accum` micro-batches forward and backward through the DeepSpeed engine and then the optimizer.
The NaN/Inf guard and the loss sums stay on the device: a non-finite loss raises the fused AdamW's `found_inf`
flag (the one torch's GradScaler uses), so the optimizer kernel itself leaves weights and moments untouched, and
the host reads the counters only when it logs. A step that branched on `torch.isfinite(loss)` in Python would stall
the CPU until the GPU caught up, every micro-batch. (With ZeRO-1/2, train.zero_waits takes the waits out of
DeepSpeed's own clipping; without ZeRO the step clips here. ZeRO-3 still waits inside DeepSpeed.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from train.config import ConfigError

LOSSES = ("loss", "text_loss", "image_loss", "z_loss")


def target_weights(counts: Sequence[int], group=None) -> list[float]:
    """Each micro-batch's weight in its step so that every text target of the step weighs the same, across
    micro-batches and ranks (as torchtitan normalises): n_i x G x world / N. A micro-batch's text loss is the mean
    over its own n_i targets, the engines divide each micro-batch by G and ranks average, so unweighted a target in
    an image-heavy micro-batch (few targets) counted more than one in a text-heavy one. The counts are the CPU
    batches' (no wait for the GPU); ranks add theirs over `group`, a CPU (gloo) group."""
    G = len(counts)
    total = float(sum(counts))
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t, group=group)
        total = float(t)
    if total <= 0:
        return [1.0] * G
    return [n * G * world / total for n in counts]


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO 1/2/3 and bf16 keep it as `.optimizer`)."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or not inner.defaults.get("fused"):
        raise ConfigError(f"the step needs torch's fused Adam/AdamW (for its found_inf flag), got {type(inner)}")
    return inner


def _tally(found_inf, step_sums, loss, text_loss, image_loss, z_loss) -> None:
    """After a micro-batch's forward: raise the flag if a loss term is not finite, add the finite terms."""
    terms = torch.stack([loss, text_loss.detach(), image_loss.detach(), z_loss.detach()])
    finite = torch.isfinite(terms).all()
    torch.maximum(found_inf, (~finite).float(), out=found_inf)
    step_sums.add_(torch.where(finite, terms, 0.0))


def _close(found_inf, step_sums, n: int, step: int | torch.Tensor, sums, counts, streak, last_bad) -> None:
    """At the step's end: a good step's mean terms join the window; skip counters and the last skipped step."""
    bad = found_inf
    sums.add_(step_sums / n * (1 - bad))
    streak.mul_(bad).add_(bad)
    counts.add_(torch.stack([1 - bad, bad, torch.zeros_like(bad)]))
    counts[2] = torch.maximum(counts[2], streak)
    last_bad.copy_(torch.where(bad > 0, step, last_bad))  # step: a number, or a device tensor (train.graphed_step)


def per_micro_batch(G: int, inject_nan: bool, weights: Sequence[float]) -> tuple[list[float], list[float]]:
    """Each micro-batch's loss scale (NaN for the first where a test injects one, else 1) and target weight (1
    where none are given)."""
    return [float("nan") if inject_nan and i == 0 else 1.0 for i in range(G)], list(weights) or [1.0] * G


def _one(x) -> bool:
    """A plain number 1 (a device tensor never is: its value is the device's)."""
    return not isinstance(x, torch.Tensor) and x == 1.0


class TrainStep:
    """Call once per optimizer step with that step's micro-batches; `take()` returns and resets the window's
    counters (one collective and one host sync, for the logging steps). Every rank skips the same steps: the flag
    is max-reduced across ranks on the device before the optimizer runs."""

    def __init__(self, engine, optimizer, device: torch.device, clip: float = 0.0):
        """clip > 0: clip the gradients to this global norm before the optimizer (see train.engine.step_clip)."""
        self.engine, self.clip = engine, clip
        self._norm: torch.Tensor | None = None  # the last step's norm before clipping, where this step clips
        self.found_inf = torch.zeros((), device=device)
        torch_optimizer(optimizer).found_inf = self.found_inf
        self.sums = torch.zeros(4, device=device)  # loss, text, image, z: summed over good steps of the window
        self.counts = torch.zeros(3, device=device)  # good steps, skipped steps, largest run of skipped steps
        self.streak = torch.zeros((), device=device)  # skipped steps in a row, across windows
        self.last_bad = torch.full((), -1.0, device=device)
        # The bookkeeping's dozens of tiny kernels, one fused kernel each on a GPU: at a sweep cell's sizes every
        # eager launch is host time the step cannot hide (docs/study/STUDY.md, GPU time).
        fuse = torch.compile if device.type == "cuda" else (lambda fn, **_: fn)
        self._tally, self._close = fuse(_tally, dynamic=False), fuse(_close, dynamic=True)

    def __call__(
        self, micro_batches: Sequence[dict], step: int, inject_nan: bool = False, weights: Sequence[float] = ()
    ):
        """Returns the first micro-batch's ModelOutput (its telemetry fields are set on telemetry steps). `weights`:
        each micro-batch's text-target weight (`target_weights`). The logged `loss` is the weighted one, whose mean over
        micro-batches and ranks is the step's objective (every target weighed once); `text_loss` and the other terms
        stay per-micro-batch means."""
        torch.compiler.cudagraph_mark_step_begin()  # with CUDA graphs (compile_mode reduce-overhead): a new step
        return self._run(micro_batches, step, *per_micro_batch(len(micro_batches), inject_nan, weights))

    def _run(self, micro_batches: Sequence[dict], step, scales: Sequence, weights: Sequence):
        """The step. `step`, each micro-batch's loss scale (1, or NaN where a test injects one) and its target
        weight are numbers here and device tensors in a captured step (train.graphed_step), which must not bake
        them in; a number 1.0 skips its kernel."""
        self.found_inf.zero_()
        step_sums = torch.zeros_like(self.sums)
        first = None
        for i, batch in enumerate(micro_batches):
            out = self.engine(**batch)
            loss = out.loss if _one(scales[i]) else out.loss * scales[i]
            if not _one(weights[i]):
                loss = loss + (weights[i] - 1.0) * (out.text_loss + out.z_loss)  # text terms weighed per target
            self._tally(self.found_inf, step_sums, loss.detach(), out.text_loss, out.image_loss, out.z_loss)
            self.engine.backward(loss)
            if i == len(micro_batches) - 1:
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(self.found_inf, op=dist.ReduceOp.MAX)  # queued on the device, not awaited
                if self.clip:  # gradients are all-reduced by now (DeepSpeed does it at the boundary's backward)
                    params = [p for p in self.engine.module.parameters() if p.grad is not None]
                    self._norm = torch.nn.utils.clip_grad_norm_(params, self.clip, foreach=True)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            first = out if first is None else first
        window = (self.sums, self.counts, self.streak, self.last_bad)
        self._close(self.found_inf, step_sums, len(micro_batches), step, *window)
        return first

    def head_rows(self, micro_batches: Sequence[dict]) -> int:
        """The rows the output head ran at for these micro-batches: their target index's length, padding included,
        or every position without one (for "MFU run", which counts the head where it ran)."""
        return sum(len(b["target_index"]) if "target_index" in b else b["tokens"].numel() for b in micro_batches)

    def grad_norm(self):
        """The last step's gradient norm before clipping, from whichever side clipped (a host sync when read)."""
        return self._norm if self.clip else self.engine.get_global_grad_norm()

    def take(self) -> dict:
        """The window's mean losses over ranks and good steps, and its skip counters, as Python numbers; then a
        fresh window. Skips agree across ranks, so only the loss sums need reducing."""
        sums = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            sums /= dist.get_world_size()
        values = torch.cat([sums, self.counts, self.last_bad.view(1)]).tolist()
        self.sums.zero_()
        self.counts.zero_()
        good = values[4]  # a window of skipped steps only has no mean loss: NaN (logged as null)
        means = {k: v / good if good else float("nan") for k, v in zip(LOSSES, values[:4], strict=True)}
        skipped, max_streak, last_bad = int(values[5]), int(values[6]), int(values[7])
        return {**means, "skipped": skipped, "max_streak": max_streak, "last_bad": last_bad}
