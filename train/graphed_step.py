"""The training step captured once as a CUDA graph and replayed: for steps too small to keep a GPU ahead of the host.

A sweep cell at the study's sizes spends most of a step in the host's Python between a few hundred small kernel
launches (the GPU busy 0.94 ms of a 5.96 ms depth-1 step, docs/study/STUDY.md). Replayed from a graph, the step's
forwards, backwards, clipping, fused AdamW and bookkeeping are one launch. What changes from step to step enters as
data: each micro-batch is copied into buffers of a fixed shape (patches padded to one a position and the target
index with -1 to a room above the counts seen, `index_room`: padding, as the model reads it), and the LR, the
micro-batches' target weights, the NaN injection of the tests and the step number are device tensors the host fills.
Semantics are TrainStep's: the same losses, skips and counters, checked against it (tests/test_train.py).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch

from train.config import ConfigError
from train.step import TrainStep, per_micro_batch, torch_optimizer

PADDED = {"patches": 0, "target_index": -1}  # the inputs whose length varies, and what pads them (patches: any)
HEADROOM, ROUND = 1.25, 256  # the target index's room: the largest count seen x HEADROOM, rounded up to ROUND


def index_room(count: int, positions: int) -> int:
    """Entries the captured target index holds for a batch of `count` targets: room for the counts to vary (a packed
    batch's share of text positions moves little from batch to batch), never more than every position. The head
    runs at every entry, padding included, so this rather than every position: at depth 8 of the study the output
    head is 40% of a token's FLOPs."""
    return min(positions, -(-int(count * HEADROOM) // ROUND) * ROUND)


def tensor_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """One device tensor as every param group's LR (fused AdamW reads it in the kernel), so that a captured step
    takes the schedule's value filled in by the host instead of the float it was captured with."""
    lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
    for group in optimizer.param_groups:
        group["lr"], group["capturable"] = lr, True
    return lr


class GraphedStep(TrainStep):
    """TrainStep's step, run eagerly for `warmup` steps on a side stream (compiles, the optimizer's state, cuBLAS
    workspaces), then captured and replayed. One process, the torch engine; every step the same number of
    micro-batches with the same tensors, rows and sequence length. On a CPU the fixed-shape step runs uncaptured."""

    def __init__(self, engine, optimizer, device: torch.device, clip: float = 0.0, warmup: int = 3):
        if getattr(engine, "kind", None) != "torch":
            raise ConfigError("deepspeed.cuda_graph: the torch engine only (one process, engine auto or torch)")
        super().__init__(engine, optimizer, device, clip)
        self.device = device
        tensor_lr(torch_optimizer(optimizer), device)
        self.warmup, self.graph, self.static, self.first = warmup, None, None, None
        self.side_stream = None  # warm-up and capture run on one stream of their own (created on a GPU only)
        self.step_t = torch.zeros((), device=device)  # the step's number, for the skip counter's `last_bad`
        self.next_step = None  # what step_t holds, as the host knows it (the graph adds one a step)
        self.weights_t = self.nan_t = None  # per micro-batch: target weight, and 1 or NaN (nan.inject_steps)
        self.weights_now: list[float] = []
        self.nan_now: list[float] = []

    def _buffers(self, batch: dict, room: int) -> dict:
        """Device buffers of a fixed shape for micro-batches like `batch`: patches padded to one a position, the
        target index to `room` entries."""
        B, T = batch["tokens"].shape
        out = {}
        for name, t in batch.items():
            if name in PADDED:
                n = room if name == "target_index" else B * T
                out[name] = torch.full((n, *t.shape[1:]), PADDED[name], dtype=t.dtype, device=self.device)
            else:
                out[name] = torch.empty_like(t, device=self.device)
        return out

    def _fit(self, micro_batches: Sequence[dict]) -> None:
        """Buffers for these micro-batches: made on the first step, and made larger, with a new capture after one
        eager step, when a batch has more targets than the captured index holds (rare: `index_room`'s headroom)."""
        B, T = micro_batches[0]["tokens"].shape
        counts = [len(b["target_index"]) for b in micro_batches if "target_index" in b]
        if self.static is not None and all(n <= len(s["target_index"]) for n, s in zip(counts, self.static)):
            return
        room = index_room(max(counts, default=0), B * T)
        if self.static is not None:  # outgrown: the graph read the old buffers
            room = max(room, min(B * T, int(len(self.static[0]["target_index"]) * HEADROOM)))
            self.graph, self.first, self.warmup = None, None, 1
        self.static = [self._buffers(b, room) for b in micro_batches]

    def head_rows(self, micro_batches: Sequence[dict]) -> int:
        """The rows the output head ran at in the last step: the captured index's, padding included."""
        if self.static and "target_index" in self.static[0]:
            return sum(len(s["target_index"]) for s in self.static)
        return super().head_rows(micro_batches)

    def _fill(self, static: dict, batch: dict) -> None:
        if static.keys() != batch.keys():
            raise ValueError(f"a captured step takes the same inputs every step: {sorted(static)}, got {sorted(batch)}")
        for name, t in batch.items():
            s = static[name]
            if name in PADDED:
                s[: len(t)].copy_(t, non_blocking=True)
                if name == "target_index":
                    s[len(t) :].fill_(-1)
            elif s.shape != t.shape:
                raise ValueError(f"a captured step takes {name} of shape {tuple(s.shape)}, got {tuple(t.shape)}")
            else:
                s.copy_(t, non_blocking=True)

    def _set(self, tensor: torch.Tensor, now: list[float], values: list[float]) -> None:
        """Fill a per-micro-batch tensor where its values changed (a launch each, so not every step)."""
        for i, (old, new) in enumerate(zip(now, values, strict=True)):
            if old != new and not (math.isnan(old) and math.isnan(new)):
                tensor[i].fill_(new)
                now[i] = new

    def _body(self):
        """The step as captured: TrainStep's, with the numbers that change read from device tensors."""
        first = self._run(self.static, self.step_t, self.nan_t, self.weights_t)
        self.step_t.add_(1)
        return first

    def __call__(
        self, micro_batches: Sequence[dict], step: int, inject_nan: bool = False, weights: Sequence[float] = ()
    ):
        G = len(micro_batches)
        model = self.engine.module
        if self.static is None:
            if model.check_inputs:  # the real batch, before padding (the trainer turns checks off after step one)
                checked = inspect.signature(model._check).parameters
                for batch in micro_batches:
                    model._check(**{k: batch[k] for k in checked if k in batch})
            self.weights_t = torch.ones(G, device=self.device)
            self.nan_t = torch.ones(G, device=self.device)
            self.weights_now, self.nan_now = [1.0] * G, [1.0] * G
        elif len(self.static) != G:
            raise ValueError(f"a captured step takes {len(self.static)} micro-batches every step, got {G}")
        self._fit(micro_batches)
        for s, b in zip(self.static, micro_batches, strict=True):
            self._fill(s, b)
        scales, weights = per_micro_batch(G, inject_nan, weights)
        self._set(self.nan_t, self.nan_now, scales)
        self._set(self.weights_t, self.weights_now, weights)
        if self.next_step != step:
            self.step_t.fill_(step)
        self.next_step = step + 1
        checks, model.check_inputs = model.check_inputs, False  # no host reads inside a graph
        try:
            if self.graph is not None:
                self.graph.replay()
                return self.first
            if self.device.type != "cuda":  # nothing to capture: the same fixed-shape step, run as it is (tests)
                return self._body()
            stream = self.side_stream = self.side_stream or torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                if self.warmup > 0:
                    self.warmup -= 1
                    first = self._body()
                else:
                    self.graph = torch.cuda.CUDAGraph()
                    # thread_local: the loader's pinning thread goes on calling CUDA while this one captures
                    with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                        self.first = self._body()
                    self.graph.replay()
                    first = self.first
            torch.cuda.current_stream(self.device).wait_stream(stream)
            return first
        finally:
            model.check_inputs = checks
