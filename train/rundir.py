"""The run directory: created and proven writable before any work (a job should not learn after hours of
training that it cannot save)."""

from __future__ import annotations

from pathlib import Path

from train.config import ConfigError


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
