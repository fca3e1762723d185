"""Held-out captioning: a caption lists a scene's objects ("a small red circle at the top left"); scored by the
objects it states exactly, as precision (a hallucinated object costs it), recall and F1 (the reward)."""

from __future__ import annotations

import json
from collections import Counter

from evals.task import Item, Task


def objects_of(caption: str) -> list[str]:
    return [o.strip() for o in caption.strip().rstrip(".").split(",") if o.strip()]


class Captioning(Task):
    name = "captioning"
    source = "scenes-caption/heldout"
    metric = "f1"

    def item(self, sample: dict) -> Item:
        meta = json.loads(sample["json"])
        return Item(image=sample["png"], prompt="a", reference=meta["caption"])

    def score(self, output: str, item: Item) -> dict[str, float]:
        said = objects_of(output if output.startswith("a ") else "a " + output)
        truth = objects_of(item.reference)
        hits = sum(1 for o in set(said) if o in truth)
        precision = hits / len(set(said)) if said else 0.0
        recall = hits / len(truth) if truth else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1}

    def baselines(self, items: list[Item]) -> dict[str, list[str]]:
        """The most common object of these items' scenes, stated for every scene."""
        counts = Counter(o for it in items for o in objects_of(it.reference))
        common = counts.most_common(1)[0][0] if counts else ""
        return {"most common object": [common] * len(items)}
