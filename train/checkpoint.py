"""Atomic checkpoints: the engine's state plus the run's own (step, tokens, FLOPs, data pipeline, RNG).

Layout: RUN/checkpoints/step_00000100/{engine files, rank_0.pt, rank_1.pt, ..., COMPLETE} and
RUN/checkpoints/latest, which names the newest complete tag. A save writes everything into its tag directory,
fsyncs it, waits for every rank, writes COMPLETE, and only then replaces `latest` (write-then-rename, each step
fsynced with its directory): a process killed, or a node that loses power, at any moment leaves `latest` on the
previous complete checkpoint; a half-written directory is ignored and removed by the next prune. A save that runs
out of disk removes its partial directory and stops with the path and the space left. Pruning keeps the newest
saves (by the order they were made, not by step number: a run restarted with resume=none in a used directory keeps
what it writes), and never what `latest` names. `resume=auto` falls back past a checkpoint that no longer loads (a
truncated file) to the newest one that does, naming both.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train import fingerprint as run_fingerprint

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


class CheckpointError(RuntimeError):
    """A save that could not complete (no space), or a resume with no checkpoint that loads."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _fsync(path: Path) -> None:
    """A file's or a directory's contents (for a directory: its entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        _fsync(p)
    _fsync(path)


def _out_of_space(error: BaseException, path: Path) -> bool:
    """ENOSPC anywhere in the chain, or a writer error without errno (torch's: "file write failed", "iostream
    error") on a disk that is now all but full."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        e = e.__cause__ or e.__context__
    try:
        usage = shutil.disk_usage(path if path.exists() else path.parent)
    except OSError:
        return False
    return usage.free < max(1 << 20, usage.total // 100)


def verify(path: Path) -> None:
    """Open every file of a checkpoint far enough to find a truncated or corrupt one (a zip's directory sits at
    its end; mmap reads no tensor data): raises CheckpointError naming the file."""
    for f in sorted(path.rglob("*.pt")):
        try:
            torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure to open is what this looks for
            raise CheckpointError(f"{f} does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, rank: int, fingerprint: dict | None = None, allow: list[str] = ()):
        """fingerprint: what this run is (train.fingerprint), written with each save and compared before a load;
        allow: the differences a resume accepts."""
        self.root, self.keep, self.rank = Path(root), max(1, keep), rank
        self.fingerprint, self.allow = fingerprint, list(allow)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "COMPLETE").exists() else None

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest save first (COMPLETE's write time; the step number breaks ties)."""
        done = [p for p in self.root.glob("step_*") if (p / "COMPLETE").exists()]
        return sorted(done, key=lambda p: ((p / "COMPLETE").stat().st_mtime_ns, p.name), reverse=True)

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        tag = f"step_{step:08d}"
        path = self.root / tag
        if self.rank == 0 and path.exists():  # a leftover from a save that was killed
            shutil.rmtree(path)
        _barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
            tmp = path / f"rank_{self.rank}.pt.tmp"
            torch.save({**rank_state, "rng": rng_state()}, tmp)
            os.replace(tmp, path / f"rank_{self.rank}.pt")
        except (OSError, RuntimeError) as e:
            if not _out_of_space(e, path):
                raise
            shutil.rmtree(path, ignore_errors=True)
            free = shutil.disk_usage(self.root).free
            kept = self.latest()
            raise CheckpointError(
                f"no space left on device while saving {path} ({free / 2**20:.1f} MiB free): removed the partial "
                f"{tag}; `latest` still names {kept.name if kept else 'no checkpoint'}. Free space (or lower "
                f"checkpoint.keep) and resume"
            ) from e
        if os.environ.get(CRASH_ENV) == str(step) and self.rank == 0:
            os.kill(os.getpid(), 9)
        _barrier()
        if self.rank == 0:
            if self.fingerprint is not None:
                run_fingerprint.save(path, self.fingerprint)
            _fsync_tree(path)  # every rank's files are written by now (the barrier); on disk before COMPLETE
            (path / "COMPLETE").write_text(f"{step}\n")
            _fsync(path / "COMPLETE")
            _fsync(path)
            pointer = self.root / "latest.tmp"
            pointer.write_text(tag)
            _fsync(pointer)
            os.replace(pointer, self.root / "latest")
            _fsync(self.root)
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
        if self.fingerprint is not None:
            run_fingerprint.check(path, self.fingerprint, self.allow)  # before any state is touched
        verify(path)  # a truncated file is named here, before the engine reads anything
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        rank_state = torch.load(path / f"rank_{self.rank}.pt", weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        return client_state, rank_state

    def load_newest_good(self, engine) -> tuple[Path, dict, dict] | None:
        """resume=auto: `latest`, else (it does not load) the newest complete checkpoint that does, with a warning
        naming the bad file and the one used. None when there is no checkpoint; CheckpointError when none loads."""
        candidates = self.complete()
        pointed = self.latest()
        if pointed in candidates:  # `latest` first: it is what the last save promised
            candidates.remove(pointed)
            candidates.insert(0, pointed)
        failures = []
        for path in candidates:
            try:
                loaded = self.load(engine, path)
            except CheckpointError as e:  # a file that does not load (verify); nothing was loaded from it
                failures.append(str(e))
                continue
            if failures:
                warnings.warn(f"resume: {'; '.join(failures)}; resuming from {path} instead", stacklevel=2)
            return (path, *loaded)
        if failures:
            raise CheckpointError(f"no checkpoint in {self.root} loads: {'; '.join(failures)}")
        return None

    def prune(self) -> None:
        """Keep the newest `keep` saves and whatever `latest` names; remove the rest and incomplete leftovers."""
        keep = set(self.complete()[: self.keep])
        if self.latest():
            keep.add(self.latest())
        for p in self.root.glob("step_*"):
            if p.is_dir() and p not in keep:
                shutil.rmtree(p, ignore_errors=True)
