"""Per-size hyperparameters by rule, and the split of a global batch over ranks, micro-batches and accumulation.

One LR for every size is what biased Kaplan et al.'s exponents (Porian et al. 2024, "Resolving Discrepancies in
Compute-Optimal Scaling of Language Models"). The forms here are the ones Porian et al. fit and model ladders use:
  - tokens per optimizer step  = batch_tokens_ref * (N / n_ref) ^ batch_exponent,  batch_exponent = 2/3
                                 (at least `min_rows` rows: below it a GPU step costs the same, launches and all)
  - learning rate              = lr_ref * (N / n_ref) ^ lr_exponent,                lr_exponent = -1/3
                                 times (floored rows / the rule's rows) ^ floor_lr_exponent where `min_rows`
                                 raised the batch (1/2: Adam's square-root rule, Malladi et al. 2022; the fourth
                                 study design's LR check found 2x the unscaled LR best at three floored sizes)
  - warmup                     = warmup_tokens_per_param * N tokens (Porian et al.: warmup of about N tokens;
                                 Kaplan's long fixed warmup was one of the discrepancies), at most
                                 max_warmup_fraction of the run
  - AdamW beta2                = 0.99 below beta2_switch_tokens (~0.5M) tokens per step, 0.95 above (Porian et al.:
                                 beta2 0.95 hurts at small batches)
The reference constants (lr_ref, batch_tokens_ref at n_ref) are this codebase's for models of 1M-100M parameters,
not values from the paper: check them with a small LR sweep at the smallest and largest size of a study, and
override them in the spec.

The batch is global: tokens per step do not depend on the launcher. The planner rounds the step's rows to a
multiple of `rows_multiple` (the same for any launch) and splits them into ranks x micro-batch rows x accumulation
steps with micro-batch rows at most the launcher's `max_micro_rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from train.config import ConfigError


@dataclass
class HparamRule:
    n_ref: float = 1e6
    lr_ref: float = 3e-3
    lr_exponent: float = -1 / 3
    batch_tokens_ref: float = 8192
    batch_exponent: float = 2 / 3
    rows_multiple: int = 8  # rows per step are a multiple of this: splits evenly over 1, 2, 4 or 8 ranks
    min_rows: int = 0  # a floor on rows per step (0: none): the smallest models' steps stop being launch-bound
    floor_lr_exponent: float = 0.5  # the LR follows a floored batch: (rows / the rule's rows) ^ this
    warmup_tokens_per_param: float = 1.0
    max_warmup_fraction: float = 0.25
    beta2_switch_tokens: float = 524288
    beta2_small_batch: float = 0.99
    beta2_large_batch: float = 0.95

    def __post_init__(self):
        if self.min_rows < 0:
            raise ConfigError(f"hparams.min_rows={self.min_rows} must be 0 (no floor) or positive")
        if self.rows_multiple < 1 or self.n_ref <= 0 or self.lr_ref <= 0 or self.batch_tokens_ref <= 0:
            raise ConfigError("hparams: rows_multiple, n_ref, lr_ref and batch_tokens_ref must be positive")

    def rule_rows(self, N: float, seq_len: int) -> int:
        """Rows per step by the rule alone, before the floor."""
        rows = self.batch_tokens_ref * (N / self.n_ref) ** self.batch_exponent / seq_len
        return max(1, round(rows / self.rows_multiple)) * self.rows_multiple

    def rows_per_step(self, N: float, seq_len: int) -> int:
        floor = math.ceil(self.min_rows / self.rows_multiple) * self.rows_multiple
        return max(self.rule_rows(N, seq_len), floor)

    def lr(self, N: float, seq_len: int = 0) -> float:
        """The rule's LR for N; given seq_len, scaled up with the batch where the floor raised it."""
        lr = self.lr_ref * (N / self.n_ref) ** self.lr_exponent
        if seq_len:
            lr *= (self.rows_per_step(N, seq_len) / self.rule_rows(N, seq_len)) ** self.floor_lr_exponent
        return lr

    def beta2(self, tokens_per_step: int) -> float:
        return self.beta2_small_batch if tokens_per_step < self.beta2_switch_tokens else self.beta2_large_batch

    def warmup_steps(self, N: float, tokens_per_step: int, steps: int) -> int:
        return min(math.ceil(self.warmup_tokens_per_param * N / tokens_per_step), int(self.max_warmup_fraction * steps))


def split_rows(rows: int, ranks: int, max_micro_rows: int) -> tuple[int, int]:
    """(micro-batch rows per rank, accumulation steps) with ranks * micro * accum == rows, micro as large as the cap
    allows (0: no cap)."""
    if rows % ranks:
        raise ConfigError(
            f"{rows} rows per step do not split over {ranks} ranks: make hparams.rows_multiple a multiple of {ranks}"
        )
    per_rank = rows // ranks
    cap = max_micro_rows or per_rank
    micro = max(d for d in range(1, min(cap, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro
