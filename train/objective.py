"""The seam between the training loop and what it optimises.

The loop (train/trainer.py) owns what every run shares: processes, the run directory and its lock, the engine, the
checkpoints and resume, signals and preemption, metrics, timing and the summary. An objective owns its step:
`lm` and `sft` take batches from the loader (train/next_token.py), `rl` generates its own and scores them
(train/rl.py). Periodic work that belongs to an objective (validation, held-out rewards) runs inside its step and
logs through the `log` it is given, so the loop has no branch per objective.
"""

from __future__ import annotations

from collections.abc import Callable

from train.config import TrainConfig

Log = Callable[..., None]  # log(step, record, prefix=""): written on rank 0, a no-op on the others


class Objective:
    """One training objective, built after the engine and the resume. `counters` are the run state's own entries
    (checkpointed with it, so a resumed run goes on counting), each starting at its value here."""

    counters: dict = {}

    def __init__(self, cfg: TrainConfig, run, engine, optimizer, model, device, rank: int, world: int, group, saved):
        """saved: this rank's state from the checkpoint resumed (`rank_state`'s), or None on a new run."""
        self.cfg, self.run, self.engine, self.optimizer, self.model = cfg, run, engine, optimizer, model
        self.device, self.rank, self.world, self.group = device, rank, world, group

    @classmethod
    def configure(cls, cfg: TrainConfig, world: int) -> TrainConfig:
        """The config the run uses, derived from the one given (before the engine is built)."""
        return cfg

    def banner(self) -> str:
        """The lines the start-up block prints between the run directory and the engine."""
        return ""

    def step(self, state: dict, lr: float, log: Log) -> None:
        """One optimizer step at state["step"] (the loop set the optimizer's LR to `lr` and advances the step
        after): update the counters in `state`, log."""
        raise NotImplementedError

    def rank_state(self) -> dict:
        """What this rank saves with a checkpoint besides the engine (the data position)."""
        return {}

    def finish(self, state: dict, log: Log) -> dict:
        """After the last step: final evaluation; the summary's entries of this objective (the loop adds the
        counters)."""
        return {}

    def close(self) -> None:
        """Release what the objective opened (log files, workers); runs however the run ended."""
