"""A batch handed from a loader worker to the trainer as one buffer, not one shared-memory file per tensor.

Why: torch's workers pass each tensor as its own shared-memory file, which the trainer's process opens and maps
(`_new_shared_filename_cpu` was the largest cost of its `next(loader)` under cProfile), then pins and copies to the
GPU one by one: eight of each a batch, host time that a tiny sweep cell's step, all host time itself, cannot hide.
Packed into one aligned byte buffer by the worker, a batch costs the trainer one file, one pin and one copy; its
tensors are views of the buffer, on the host and on the GPU alike (`benchmarks/data_speed.py --handoff`,
docs/study/STUDY.md, GPU time).
"""

from __future__ import annotations

import torch

ALIGN = 64  # bytes: every tensor starts aligned (a view as int64 needs 8; compiled kernels assume 16)


def pack(batch: dict[str, torch.Tensor], pin_memory: bool = False) -> tuple[torch.Tensor, tuple]:
    """(buffer, layout): the tensors' bytes one after another in a uint8 buffer (page-locked with pin_memory), and
    per tensor its (name, dtype, shape, offset)."""
    layout, offset = [], 0
    for name, t in batch.items():
        layout.append((name, t.dtype, tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=pin_memory)
    for (_, _, _, start), t in zip(layout, batch.values(), strict=True):
        n = t.numel() * t.element_size()
        buffer[start : start + n] = t.contiguous().view(-1).view(torch.uint8)
    return buffer, tuple(layout)


def unpack(buffer: torch.Tensor, layout: tuple) -> dict[str, torch.Tensor]:
    """The batch's tensors as views of `buffer` (on whatever device it is)."""
    out = {}
    for name, dtype, shape, start in layout:
        n = torch.Size(shape).numel() * dtype.itemsize
        out[name] = buffer[start : start + n].view(dtype).view(shape)
    return out


class Handed:
    """What a loader worker yields: the batch's buffer and layout, and its stream's bookkeeping (`meta`). One object
    with a `pin_memory` method, so the DataLoader's pinning thread pins it in one call. As a dict it walked and
    copied every entry of the bookkeeping, the rows' pieces included: about 1,700 Python objects a 64-row study
    batch, 8 ms of a thread that takes the trainer's GIL from the thread launching the GPU's work (cProfile on an
    H200, docs/perf/study_step_profile_d1_h200.txt). The loader's ceiling on that host, about 12,500 rows a second,
    holds without pinning too (docs/perf/loader_scaling_study_h200.txt), so this was not what set it."""

    __slots__ = ("buffer", "layout", "meta")

    def __init__(self, buffer: torch.Tensor, layout: tuple, meta: dict):
        self.buffer, self.layout, self.meta = buffer, layout, meta

    def pin_memory(self, device=None) -> Handed:
        self.buffer = self.buffer.pin_memory()
        return self


class HandedBatch(dict):
    """A batch as the trainer receives it: a dict of host tensors (views of one buffer) that moves to a device in
    one copy."""

    def __init__(self, buffer: torch.Tensor, layout: tuple):
        super().__init__(unpack(buffer, layout))
        self.buffer, self.layout = buffer, layout

    def to(self, device: torch.device, non_blocking: bool = False) -> dict[str, torch.Tensor]:
        return unpack(self.buffer.to(device, non_blocking=non_blocking), self.layout)


def to_device(batch: dict, device: torch.device, non_blocking: bool = True) -> dict[str, torch.Tensor]:
    """Any batch on `device`: a HandedBatch in one copy, another dict tensor by tensor."""
    if isinstance(batch, HandedBatch):
        return batch.to(device, non_blocking=non_blocking)
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


class SideCopy:
    """Batches to a GPU on a copy stream of their own. On the compute stream a batch's copy queued behind the step
    before it and held the next step's kernels until it was done; on its own stream it runs while that step's
    kernels do (the host issues it ahead, the GPU being the bound), and the compute stream waits for it only where
    the batch is first read. The copy's device memory is marked in use by the compute stream (`record_stream`), so
    the allocator hands it out again only once the step that read it is done. Elsewhere: `to_device`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.stream is None:
            return to_device(batch, self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            moved = to_device(batch, self.device, non_blocking=True)
        compute.wait_stream(self.stream)
        for t in one_per_storage(moved.values()):
            t.record_stream(compute)
        return moved


def one_per_storage(tensors) -> list[torch.Tensor]:
    """A tensor for each storage among `tensors`: a handed batch's tensors are views of its one buffer, so marking
    one of them (`record_stream`) marks the memory of all."""
    return list({t.untyped_storage().data_ptr(): t for t in tensors}.values())
