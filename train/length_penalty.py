"""Length terms for RL on reasoning: a reward for each of a group's samples from its thought's length (thought tokens
only: the answer is never penalised) and whether it was right. Each is added to the task's correctness reward.

  none     0: RL without a penalty, the control.
  kimi     Kimi k1.5 (Kimi Team 2025, section 2.3.3): within a group, lambda = 0.5 - (len - min) / (max - min), so
           the shortest sample gets +0.5 and the longest -0.5; a right sample gets alpha * lambda, a wrong one
           alpha * min(0, lambda) (a wrong answer is never rewarded for being short). 0 when all lengths are equal.
  sigmoid  Arora & Zanette 2025 ("Training Language Models to Reason Efficiently"): right samples only, by how
           their length stands among the group's right samples: -alpha * sigmoid((len - mean) / std), so a right
           sample keeps at least 1 - alpha of its reward; a wrong one gets 0. One knob, alpha in [0, 1).
  dapo     DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_len - cache, then falling linearly
           to -1 at max_len, and -1 beyond it; alpha scales it.
  l1       L1 (Aggarwal & Welleck 2025, "L1: Controlling How Long A Reasoning Model Thinks"): a target length is
           written into the prompt and the reward is -alpha * |len - target| (their LCPO-exact form).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

KINDS = ("none", "kimi", "sigmoid", "dapo", "l1")


def length_rewards(
    kind: str,
    lengths: Sequence[int],
    correct: Sequence[bool],
    alpha: float,
    max_len: int = 0,
    cache: int = 0,
    targets: Sequence[int] = (),
) -> list[float]:
    """The length term of each sample of one group (one prompt's samples)."""
    n = len(lengths)
    if kind == "none" or alpha == 0:
        return [0.0] * n
    if kind == "kimi":
        lo, hi = min(lengths), max(lengths)
        if hi == lo:
            return [0.0] * n
        lam = [0.5 - (x - lo) / (hi - lo) for x in lengths]
        return [alpha * (v if ok else min(0.0, v)) for v, ok in zip(lam, correct, strict=True)]
    if kind == "sigmoid":
        right = [x for x, ok in zip(lengths, correct, strict=True) if ok]
        if not right:
            return [0.0] * n
        mean = sum(right) / len(right)
        std = math.sqrt(sum((x - mean) ** 2 for x in right) / len(right))
        scale = std if std > 0 else 1.0
        return [
            -alpha / (1 + math.exp(-(x - mean) / scale)) if ok else 0.0 for x, ok in zip(lengths, correct, strict=True)
        ]
    if kind == "dapo":
        if not 0 < cache <= max_len:
            raise ValueError(f"dapo needs 0 < cache <= max_len (got cache={cache}, max_len={max_len})")
        free = max_len - cache
        return [alpha * (0.0 if x <= free else max(-1.0, (free - x) / cache)) for x in lengths]
    if kind == "l1":
        if len(targets) != n:
            raise ValueError("l1 needs a target length per sample")
        return [-alpha * abs(x - t) for x, t in zip(lengths, targets, strict=True)]
    raise ValueError(f"length penalty '{kind}' is not one of {KINDS}")
