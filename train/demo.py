"""Show what a trained model does on held-out scenes: its caption and its answer to a question, next to the
truth. `python -m train.demo RUN_DIR [--n 6] [--score 100]` (exports the latest checkpoint first if needed).

The held-out scenes each contain a colour-shape pair never seen in training, so `--score` measures
compositional generalisation, not memorised scenes. The scores are evals/'s (exact answers per question type,
caption object precision/recall/F1, digit names), each printed next to its blind baselines. Training data follows
an image with either a caption or a question, so a caption is prompted with its first word, "a".
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
import yaml

from data.images import ImageSpec, load_image
from data.layout import layout_document
from data.packing import document_batch
from data.pipeline import read_shard
from data.shards import resolve_shards
from data.tokenizer import Tokenizer
from evals.harness import evaluate, table
from evals.registry import get_task
from model import generate, load_pretrained
from train.export import export

DEMO_TASKS = ("vqa", "captioning", "digits")


def heldout_scenes(data_root: Path, n: int) -> list[dict]:
    samples = []
    for shard in resolve_shards(str(data_root / "scenes-qa" / "heldout")):
        samples += read_shard(shard, Counter())
        if len(samples) >= n:
            break
    return samples[:n]


def complete(model, tok: Tokenizer, segments: list, patch: int, scheme: str, max_new: int = 48) -> str:
    doc = layout_document(segments, tok.special, patch, scheme, eos=False)
    out = generate(model, document_batch(doc), max_new_tokens=max_new, eos_id=tok.special.eos)
    return tok.decode(out.tokens).strip()


@torch.no_grad()
def run_demo(run_dir: str | Path, n_show: int = 6, n_score: int = 100) -> dict:
    run = Path(run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if not (run / "export" / "model.safetensors").exists():
        export(run)
    model = load_pretrained(run / "export")
    tok = Tokenizer(cfg["data"]["tokenizer"])
    patch, scheme = model.cfg.patch_size, model.cfg.position_scheme
    spec = ImageSpec(patch, cfg["data"]["max_image_patches"])
    data_root = Path(cfg["data"]["tokenizer"]).parent
    scenes = heldout_scenes(data_root, n_show)
    if not scenes:
        raise SystemExit(
            f"the demo scores held-out scenes of the embedded dataset, read from {data_root / 'scenes-qa' / 'heldout'}"
            f" (beside the run's tokenizer), and found none there: it shows runs trained on `python -m data.embedded`"
            f" data"
        )
    for i, sample in enumerate(scenes):  # a few scenes shown whole; the scores come from evals/ below
        meta = json.loads(sample["json"])
        image = load_image(sample["0.png"], spec)
        caption = "a " + complete(model, tok, [image, tok.encode("a")], patch, scheme)
        answer = complete(model, tok, [image, tok.encode(f"question: {meta['question']} answer:")], patch, scheme)
        print(f"--- held-out scene {i} ({', '.join(o['color'] + ' ' + o['shape'] for o in meta['objects'])})")
        print(f"  caption  model: {caption}\n           truth: {meta['caption']}")
        print(f"  Q: {meta['question']}\n  A        model: {answer.rstrip('.')}\n           truth: {meta['answer']}")
    # scored through evals/ on n_score items per task, each next to a blind guess and the model without the image
    evals = [evaluate(model, tok, task, task.items(data_root, n_score)) for task in map(get_task, DEMO_TASKS)]
    result = {"evals": evals}
    print(table(evals))
    (run / "demo.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--n", type=int, default=6, help="scenes to print")
    ap.add_argument("--score", type=int, default=100, help="scenes to score")
    args = ap.parse_args(argv)
    run_demo(args.run_dir, args.n, args.score)


if __name__ == "__main__":
    main()
