"""Held-out visual question answering: exact match of the answer, per question type (count, colour, spatial)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from evals.task import Item, Task


def question_type(question: str) -> str:
    if question.startswith("how many"):
        return "count"
    if question.startswith("what color"):
        return "color"
    return "spatial"


class VQA(Task):
    name = "vqa"
    source = "scenes-qa/heldout"
    metric = "exact"

    def item(self, sample: dict) -> Item:
        meta = json.loads(sample["json"])
        q = meta["question"]
        return Item(
            image=sample["0.png"], prompt=f"question: {q} answer:", reference=meta["answer"], kind=question_type(q)
        )

    def score(self, output: str, item: Item) -> dict[str, float]:
        return {"exact": float(output.strip().rstrip(".").strip() == item.reference)}

    def baselines(self, items: list[Item]) -> dict[str, list[str]]:
        """The most common answer of each question type among these items (what a prior over answers gets)."""
        by_kind: dict[str, Counter] = defaultdict(Counter)
        for it in items:
            by_kind[it.kind][it.reference] += 1
        return {"majority per type": [by_kind[it.kind].most_common(1)[0][0] for it in items]}
