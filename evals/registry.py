"""Tasks by name: `python -m evals DIR --tasks captioning,vqa,digits` (or the reasoning tasks: count,twohop,...)."""

from __future__ import annotations

from evals.captioning import Captioning
from evals.digits import Digits
from evals.reasoning import ReasoningTask
from evals.task import Task
from evals.vqa import VQA

TASKS: dict[str, type[Task]] = {t.name: t for t in (Captioning, VQA, Digits)}
REASONING = ("count", "twohop", "digitsum", "arith")  # data.reasoning's tasks, asked in the reasoning modes


def get_task(name: str) -> Task:
    if name in REASONING:
        return ReasoningTask(name)
    if name not in TASKS:
        raise KeyError(f"unknown task '{name}' (known: {', '.join(sorted([*TASKS, *REASONING]))})")
    return TASKS[name]()
