"""Score a model on named tasks, each next to blind baselines on the same items.

    python -m evals DIR --tasks captioning,vqa,digits [--n 200] [--data ROOT] [--json out.json]
    python -m evals DIR --tasks count,twohop,digitsum,arith --data artifacts/reasoning
                        [--modes instant,thinking,contemplating] [--chains 4]

DIR: an export or a run directory (as `python -m infer` takes it). ROOT: the dataset the tasks read (default: the
run's data root, beside its tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from data.chat import MODES
from data.tokenizer import Tokenizer
from evals.harness import evaluate, table
from evals.reasoning import ReasoningTask, evaluate_modes, modes_markdown
from evals.registry import get_task
from infer.__main__ import resolve_model
from model import load_pretrained


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evals", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model")
    ap.add_argument("--tasks", default="captioning,vqa,digits")
    ap.add_argument("--n", type=int, default=200, help="items per task")
    ap.add_argument("--data", help="dataset root (default: the run's, beside its tokenizer)")
    ap.add_argument("--max-new-tokens", type=int, help="default: 48 (captions, answers), 256 (reasoning traces)")
    ap.add_argument("--modes", default="instant,thinking", help="reasoning tasks: the modes to ask in")
    ap.add_argument("--chains", type=int, default=4, help="reasoning tasks: contemplating's chains")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    export = resolve_model(args.model)
    root = args.data
    if root is None and (Path(args.model) / "config.yaml").exists():
        root = Path(yaml.safe_load((Path(args.model) / "config.yaml").read_text())["data"]["tokenizer"]).parent
    if root is None:
        raise SystemExit("error: give --data ROOT (an export does not record the data it was trained on)")
    try:
        tasks = [get_task(t) for t in args.tasks.split(",") if t]
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from e
    model = load_pretrained(export, "cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer(export / "tokenizer.model")
    results, reasoning = [], []
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"error: unknown mode(s) {unknown}: of {', '.join(MODES)}")
    for task in tasks:
        items = task.items(root, args.n)
        if not items:
            raise SystemExit(f"error: task '{task.name}' found no items under {Path(root) / task.source}")
        if isinstance(task, ReasoningTask):
            reasoning.append(evaluate_modes(model, tok, task, items, modes, args.chains, args.max_new_tokens or 256))
        else:
            results.append(evaluate(model, tok, task, items, args.max_new_tokens or 48))
    if results:
        print(table(results))
    if reasoning:
        print(modes_markdown(reasoning))
    results += reasoning
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
