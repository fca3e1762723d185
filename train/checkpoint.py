"""Atomic checkpoints: DeepSpeed's engine state plus the run's own (step, tokens, FLOPs, data pipeline, RNG).

Layout: RUN/checkpoints/step_00000100/{DeepSpeed files, rank_0.pt, rank_1.pt, ..., COMPLETE} and
RUN/checkpoints/latest, which names the newest complete tag. A save writes everything into its tag directory,
waits for every rank, writes COMPLETE, and only then replaces `latest` (write-then-rename). A process killed at
any moment leaves `latest` on the previous complete checkpoint; a half-written directory is ignored and removed
by the next prune.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CRASH_ENV = "FUSION_TEST_KILL_DURING_SAVE"  # fault injection for the tests: SIGKILL this rank mid-save


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, rank: int):
        self.root, self.keep, self.rank = Path(root), max(1, keep), rank

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "COMPLETE").exists() else None

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        tag = f"step_{step:08d}"
        path = self.root / tag
        if self.rank == 0 and path.exists():  # a leftover from a save that was killed
            shutil.rmtree(path)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        tmp = path / f"rank_{self.rank}.pt.tmp"
        torch.save({**rank_state, "rng": rng_state()}, tmp)
        os.replace(tmp, path / f"rank_{self.rank}.pt")
        if os.environ.get(CRASH_ENV) == str(step) and self.rank == 0:
            os.kill(os.getpid(), 9)
        _barrier()
        if self.rank == 0:
            (path / "COMPLETE").write_text(f"{step}\n")
            pointer = self.root / "latest.tmp"
            pointer.write_text(tag)
            os.replace(pointer, self.root / "latest")
            self.prune()
        _barrier()
        return path

    def load(self, engine, path: str | Path) -> tuple[dict, dict]:
        path = Path(path)
        if not (path / "COMPLETE").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        if (path / "optim_states.pt").exists() and getattr(engine, "kind", "deepspeed") != "torch":
            raise ValueError(
                f"{path} was written by the one-process torch engine; resume it in one process with "
                f"deepspeed.engine=auto or torch (or start a multi-process run from its export)"
            )
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        rank_state = torch.load(path / f"rank_{self.rank}.pt", weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        return client_state, rank_state

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; remove older ones and incomplete leftovers."""
        tags = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        complete = [p for p in tags if (p / "COMPLETE").exists()]
        keep = set(complete[-self.keep :])
        for p in tags:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
