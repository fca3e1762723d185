"""Score a model on named tasks, each next to blind baselines on the same items.

    python -m evals DIR --tasks captioning,vqa,digits [--n 200] [--data ROOT] [--json out.json]

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

from data.tokenizer import Tokenizer
from evals.harness import evaluate, table
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
    ap.add_argument("--max-new-tokens", type=int, default=48)
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
    results = []
    for task in tasks:
        items = task.items(root, args.n)
        if not items:
            raise SystemExit(f"error: task '{task.name}' found no items under {Path(root) / task.source}")
        results.append(evaluate(model, tok, task, items, args.max_new_tokens))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
