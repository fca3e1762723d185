"""Digit naming on real MNIST digits (the embedded data's held-out split): the model completes "a handwritten" with
the digit's name; exact match."""

from __future__ import annotations

import json
from collections import Counter

from evals.task import Item, Task

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Digits(Task):
    name = "digits"
    source = "digits/val"
    metric = "exact"

    def item(self, sample: dict) -> Item:
        label = int(json.loads(sample["json"])["label"])
        return Item(image=sample["png"], prompt="a handwritten", reference=NAMES[label])

    def score(self, output: str, item: Item) -> dict[str, float]:
        words = output.strip().rstrip(".").split()
        return {"exact": float(bool(words) and words[0] == item.reference)}

    def baselines(self, items: list[Item]) -> dict[str, list[str]]:
        """The most common digit among these items, named for every one."""
        common = Counter(it.reference for it in items).most_common(1)[0][0] if items else ""
        return {"most common digit": [common] * len(items)}
