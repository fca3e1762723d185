"""Tasks by name: `python -m evals DIR --tasks captioning,vqa,digits`."""

from __future__ import annotations

from evals.captioning import Captioning
from evals.digits import Digits
from evals.task import Task
from evals.vqa import VQA

TASKS: dict[str, type[Task]] = {t.name: t for t in (Captioning, VQA, Digits)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task '{name}' (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]()
