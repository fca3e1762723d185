"""Validation on held-out sources: loss per source (text and image), and overall, token-weighted."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from data.pipeline import DataConfig, eval_batches
from model import IGNORE


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def validate(engine, data: DataConfig, max_batches: int, device: torch.device, rank: int, world: int) -> dict:
    """Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each one)."""
    was_training = engine.training
    engine.eval()
    results = {}
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # text loss sum, targets, image loss sum, patches
    for source in data.eval_sources:
        batches = list(itertools.islice(eval_batches(data, source, rank, world), max_batches))
        count = int(_all_reduce(torch.tensor([len(batches)], device=device), dist.ReduceOp.MIN))
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for batch in batches[:count]:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = engine(**batch)
            n_text = (batch["targets"] != IGNORE).sum().double()
            n_patch = batch["patch_mask"].sum().double()
            sums += torch.stack([out.text_loss.double() * n_text, n_text, out.image_loss.double() * n_patch, n_patch])
        _all_reduce(sums)
        totals += sums
        results[f"{source.name}/text_loss"] = float(sums[0] / sums[1].clamp(min=1))
        if float(sums[2]):
            results[f"{source.name}/image_loss"] = float(sums[2] / sums[3].clamp(min=1))
        results[f"{source.name}/targets"] = int(sums[1])
    if data.eval_sources:
        results["text_loss"] = float(totals[0] / totals[1].clamp(min=1))
    engine.train(was_training)
    return results
