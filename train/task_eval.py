"""Evaluation tasks during training (`eval.tasks`): the evals/ tasks through the batched engine, on rank 0, with
the held-out losses (every `eval.every` steps and at the end). Flat results for metrics.jsonl and TensorBoard:
task/<name>/<metric>, its blind baselines (task/<name>/baseline/<what>) and the seconds it took."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from train.config import TrainConfig


class TaskEval:
    def __init__(self, cfg: TrainConfig, rank: int, world: int):
        self.cfg, self.active = cfg, bool(cfg.eval.tasks) and rank == 0
        if cfg.eval.tasks and cfg.deepspeed.zero_stage == 3 and world > 1:
            warnings.warn("eval.tasks is skipped under ZeRO-3: rank 0 alone cannot gather the weights", stacklevel=2)
            self.active = False
        self._items: dict | None = None

    def __call__(self, model: torch.nn.Module) -> dict:
        if not self.active:
            return {}
        from data.tokenizer import Tokenizer
        from evals.harness import evaluate
        from evals.registry import get_task

        ev = self.cfg.eval
        root = Path(ev.task_data or Path(self.cfg.data.tokenizer).parent)
        tok = Tokenizer(self.cfg.data.tokenizer)
        if self._items is None:  # read once per run
            self._items = {name: (get_task(name), get_task(name).items(root, ev.task_items)) for name in ev.tasks}
        was_training = model.training
        out: dict = {}
        try:
            # compiled regions run eagerly here: decoding's shapes (and its cache) are not the training step's
            with torch.compiler.set_stance("force_eager"):
                for name, (task, items) in self._items.items():
                    r = evaluate(model, tok, task, items, ev.task_max_new_tokens)
                    out[f"task/{name}/{task.metric}"] = r["model"][task.metric]
                    for what, scores in r["baselines"].items():
                        out[f"task/{name}/baseline/{what}"] = scores[task.metric]
                    out[f"task/{name}/seconds"] = r["seconds"]
        finally:
            model.train(was_training)
        return out
