"""Evaluation tasks (data, a scorer, and the same scorer as an RL reward) and the harness that runs them through
the batched engine (infer/), each score next to blind baselines computed on the same items."""

from evals.registry import TASKS, get_task

__all__ = ["TASKS", "get_task"]
