"""Fine-tuning's start: the weights of an exported model (`init_weights`: an export or a run directory with one),
loaded into the model before its engine is built (DeepSpeed's ZeRO optimizers copy the weights they start from),
with none of the run's optimizer state, step or data position. A checkpoint of the run itself, when there is one,
loads over them as usual."""

from __future__ import annotations

import dataclasses

from model import load_pretrained
from train.config import ConfigError

FREE = ("attention_backend", "dropout", "max_seq_len")  # free to differ: no weight depends on them


def load_weights(model, source: str) -> None:
    try:
        pretrained = load_pretrained(source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init_weights: {e}") from e
    ours, theirs = dataclasses.asdict(model.cfg), dataclasses.asdict(pretrained.cfg)
    differ = sorted(k for k in ours if k not in FREE and ours[k] != theirs.get(k))
    if differ:
        pairs = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} here" for k in differ)
        raise ConfigError(f"init_weights={source}: its model differs from this config's ({pairs})")
    model.load_state_dict(pretrained.state_dict())
