"""The run directory: created and proven writable before any work (a job should not learn after hours of
training that it cannot save), and held by one trainer at a time (RunLock)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from train.config import ConfigError

# Written by the trainer when a process's first steps are done: its compiled graphs are in inductor's on-disk cache
# from then on, which a sweep driver waits for before it starts another cell of that shape (scaling.local.CompileGate)
FIRST_STEPS_FILE = "first_steps.json"


def ensure_run_dir(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    try:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run / "checkpoints" / ".writable"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir {run} is not writable: {e}") from e
    return run


class RunDirInUse(ConfigError):
    """Another live trainer holds the run directory."""


class RunLock:
    """RUN/LOCK: who trains in this directory (host, PID, SLURM job, start), refreshed while the run lives. A second
    trainer, or a resubmitted task while the first still runs, is refused with the holder named. A lock is taken
    over when its holder is gone: a dead PID on this host, the same SLURM job (a requeue), or no refresh for
    `stale_s` seconds (a holder on another host that died without releasing it)."""

    def __init__(self, run_dir: str | Path, stale_s: float = 900.0):
        self.path, self.stale_s = Path(run_dir) / "LOCK", stale_s
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.time(),
        }

    def _stale(self, holder: dict) -> bool:
        if holder.get("slurm_job") and holder["slurm_job"] == self.me["slurm_job"]:
            return True  # this job before its requeue
        if holder.get("host") == self.me["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, another user's
                return False
            return int(holder["pid"]) == self.me["pid"]
        return time.time() - self.path.stat().st_mtime > self.stale_s

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}  # half-written by a holder killed at once: nobody holds it
                if holder and not self._stale(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    raise RunDirInUse(
                        f"run_dir {self.path.parent} is in use by PID {holder.get('pid')} on {holder.get('host')} "
                        f"(since {since}): stop that run, or remove {self.path} if it is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # taken over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return
        raise RunDirInUse(f"could not take {self.path}: another trainer took it first")

    def refresh(self) -> None:
        """The holder is alive: called at every logging step."""
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
