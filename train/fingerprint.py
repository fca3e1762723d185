"""What a resume must not change silently: the model's shape, the tokenizer's bytes, the data's layout, its sources
and their weights, and world size x workers (the data streams). Saved with every checkpoint
(`fingerprint.json`) and compared before one is loaded; a difference stops the resume with the keys that differ.
What is safe to change is not in it (learning rate, schedule, steps, evaluation, logging, checkpoint cadence), and
`resume_allow` accepts listed differences on purpose (e.g. `resume_allow=[data.sources]` to change the mixture;
positions are kept per source name, and a source added starts at its beginning)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from train.config import ConfigError, TrainConfig, to_dict

FILE = "fingerprint.json"
FREE_MODEL_KEYS = ("attention_backend",)  # which kernel computes attention changes no weight


def _flat(d, prefix: str) -> dict:
    if isinstance(d, dict):
        return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    return {prefix: d}


def fingerprint(cfg: TrainConfig, world: int) -> dict:
    tokenizer = Path(cfg.data.tokenizer)
    model = {k: v for k, v in to_dict(cfg.model).items() if k not in FREE_MODEL_KEYS}
    data = cfg.data
    values = {
        "model": model,
        "tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest() if tokenizer.is_file() else None,
        "data": {
            "seq_len": data.seq_len,
            "patch_size": data.patch_size,
            "max_image_patches": data.max_image_patches,
            "position_scheme": data.position_scheme,
            "seed": data.seed,
            "workers": max(1, data.workers),
            "sources": {s.name: {"shards": s.shards, "weight": s.weight} for s in data.sources},
        },
        "world_size": world,
    }
    return {k: v for key, value in values.items() for k, v in _flat(value, key).items()}


def save(path: Path, values: dict) -> None:
    (path / FILE).write_text(json.dumps(values, indent=1, sort_keys=True))


def check(checkpoint: Path, now: dict, allow: list[str]) -> None:
    """Raise ConfigError naming every key that differs from the checkpoint's fingerprint and is not allowed (a key
    is allowed by itself or by a prefix of it). Checkpoints written before fingerprints existed pass."""
    saved_file = Path(checkpoint) / FILE
    if not saved_file.exists():
        return
    saved = json.loads(saved_file.read_text())
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    refused = [k for k in differ if not any(k == a or k.startswith(a + ".") for a in allow)]
    if refused:
        lines = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in refused)
        raise ConfigError(
            f"resume from {checkpoint}: {lines}. These change what the run is: start a new run_dir, or accept the "
            f"change with resume_allow=[{', '.join(refused)}]"
        )
