"""Validation on held-out sources: loss per source (text and image), and overall, token-weighted; and text bits per
byte (the text loss in bits over the UTF-8 bytes its targets stand for), which compares across tokenizers."""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.distributed as dist

from data.pipeline import DataConfig, eval_batches
from data.tokenizer import Tokenizer
from model import IGNORE


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


@functools.lru_cache(maxsize=4)
def _byte_table(tokenizer: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(Tokenizer(tokenizer).bytes_per_token(), dtype=torch.float64, device=device)


@torch.no_grad()
def validate(engine, data: DataConfig, max_batches: int, device: torch.device, rank: int, world: int) -> dict:
    """Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each one)."""
    was_training = engine.training
    engine.eval()
    results = {}
    # text loss sum, targets, image loss sum, patches, UTF-8 bytes of the text targets
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    table = _byte_table(data.tokenizer, device)
    for source in data.eval_sources:
        batches = list(itertools.islice(eval_batches(data, source, rank, world), max_batches))
        count = int(_all_reduce(torch.tensor([len(batches)], device=device), dist.ReduceOp.MIN))
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        for batch in batches[:count]:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = engine(**batch)
            n_text = (batch["targets"] != IGNORE).sum().double()
            n_patch = batch["patch_mask"].sum().double()
            targets = batch["targets"]
            n_bytes = table[targets.clamp(min=0)].masked_fill(targets == IGNORE, 0).sum()
            sums += torch.stack(
                [out.text_loss.double() * n_text, n_text, out.image_loss.double() * n_patch, n_patch, n_bytes]
            )
        _all_reduce(sums)
        totals += sums
        results[f"{source.name}/text_loss"] = float(sums[0] / sums[1].clamp(min=1))
        if float(sums[2]):
            results[f"{source.name}/image_loss"] = float(sums[2] / sums[3].clamp(min=1))
        results[f"{source.name}/targets"] = int(sums[1])
        if float(sums[4]):
            results[f"{source.name}/bits_per_byte"] = float(sums[0] / math.log(2) / sums[4])
    if data.eval_sources:
        results["text_loss"] = float(totals[0] / totals[1].clamp(min=1))
        if float(totals[4]):
            results["bits_per_byte"] = float(totals[0] / math.log(2) / totals[4])
    engine.train(was_training)
    return results
