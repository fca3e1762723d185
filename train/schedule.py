"""Learning-rate schedules as a pure function of the step, so a resumed run needs no scheduler state.

cosine:   linear warmup, then cosine from lr down to min_lr_ratio * lr at the last step
wsd:      linear warmup, constant, then a cooldown over the last cooldown_fraction of steps to min_lr_ratio *
          lr, shaped 1-sqrt (Hägele et al. 2024's best), linear or cosine. A cooldown can branch from any
          stable-phase checkpoint: the stable phase does not depend on the total step count.
constant: linear warmup, then lr
"""

from __future__ import annotations

import math

import torch

from train.config import ScheduleConfig


def lr_at(step: int, total_steps: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """LR for optimizer step `step` (0-based) of a run of `total_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    floor = base_lr * cfg.min_lr_ratio
    if cfg.kind == "constant":
        return base_lr
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    cooldown = max(1, round(cfg.cooldown_fraction * total_steps))
    start = total_steps - cooldown
    if step < start:
        return base_lr
    progress = min(1.0, (step - start + 1) / cooldown)
    shape = {
        "1-sqrt": 1 - math.sqrt(progress),
        "linear": 1 - progress,
        "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
    }[cfg.cooldown_shape]
    return floor + (base_lr - floor) * shape


def set_lr(optimizer, lr: float) -> None:
    """Set every param group's LR: in place where it is a tensor (a captured step reads it), else as a float."""
    filled = set()
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            if id(group["lr"]) not in filled:
                group["lr"].fill_(lr)
                filled.add(id(group["lr"]))
        else:
            group["lr"] = lr
