"""Training data for Contemplating's synthesis pass, from a model's own samples: the candidates are the model's, the
target is the truth (how learned aggregators are trained, rather than a vote).

For each training item of the reasoning tasks (data.reasoning): N thinking chains at temperature 1, their answers
listed as the synthesis turn's given thought (read, not a target: data.chat's `thought_given`), the reference
answer as what the assistant writes. Sets whose majority is wrong are kept as they come; their share is printed and
stored, since they are what can teach the synthesis to beat a vote.

    python -m infer.synthesis --model runs/sft-demo --data artifacts/reasoning --out artifacts/synthesis
                              [--items 300] [--chains 4] [--batch 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from data.chat import ChatTokens, parse, synthesis_thought
from data.images import ImageSpec, load_image
from data.pipeline import read_shard
from data.reasoning import TASKS
from data.shards import DatasetWriter, resolve_shards
from data.tokenizer import Tokenizer
from infer.engine import Engine, SamplingParams
from infer.modes import prompt, stop_ids


def _user(meta: dict, sample: dict, spec: ImageSpec) -> list[dict]:
    turn = meta["messages"][0]
    parts = [load_image(sample[p["image"]], spec) if "image" in p else p["text"] for p in turn["content"]]
    return [{"role": "user", "content": parts}]


def build(model, tok, data: Path, out: Path, items: int, chains: int, batch: int, seed: int, max_new: int) -> dict:
    engine, t, cfg = Engine(model), ChatTokens.of(tok), model.cfg
    spec = ImageSpec(cfg.patch_size, cfg.max_image_patches)
    stats = {}
    for task in TASKS:
        samples = []
        for shard in resolve_shards(str(data / task / "train")):
            samples += read_shard(shard, Counter())
            if len(samples) >= items:
                break
        samples = samples[:items]
        counts = Counter()
        with DatasetWriter(out / task / "train", 1000) as w:
            for b in range(0, len(samples), batch):
                group = samples[b : b + batch]
                metas = [json.loads(s["json"]) for s in group]
                prompts = [prompt(_user(m, s, spec), tok, "thinking", cfg) for m, s in zip(metas, group, strict=True)]
                params = SamplingParams(max_new, 1.0, 1.0, 0, stop_ids(t), seed + b)
                ids = engine.generate([p for p in prompts for _ in range(chains)], params)
                for k, (meta, s) in enumerate(zip(metas, group, strict=True)):
                    answers = [
                        tok.decode(parse(x, "thinking", t).answer).strip() for x in ids[k * chains : (k + 1) * chains]
                    ]
                    truth = meta["answer"]
                    vote = Counter(answers).most_common(1)[0][0]
                    counts["sets"] += 1
                    counts["majority_right"] += vote == truth
                    counts["any_right"] += truth in answers
                    turn = {"role": "assistant", "thought": synthesis_thought(answers), "thought_given": True}
                    members = {
                        "json": {
                            "messages": [meta["messages"][0], {**turn, "content": truth}],
                            "task": task,
                            "answer": truth,
                        }
                    }
                    if "0.png" in s:
                        members["0.png"] = s["0.png"]
                    w.write(f"{task}-synth-{b + k:07d}", members)
        stats[task] = {
            "sets": counts["sets"],
            "majority_wrong": 1 - counts["majority_right"] / max(1, counts["sets"]),
            "none_right": 1 - counts["any_right"] / max(1, counts["sets"]),
        }
        print(task, json.dumps(stats[task]), flush=True)
    (out / "synthesis.json").write_text(json.dumps({"chains": chains, "seed": seed, "tasks": stats}, indent=1) + "\n")
    return stats


def main(argv=None) -> int:
    from infer.__main__ import resolve_model
    from model import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="artifacts/reasoning")
    ap.add_argument("--out", default="artifacts/synthesis")
    ap.add_argument("--items", type=int, default=300, help="training items per task")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="items per batch (times chains rows)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    export = resolve_model(args.model)
    model = load_pretrained(export, "cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer(export / "tokenizer.model")
    with torch.inference_mode():
        build(
            model,
            tok,
            Path(args.data),
            Path(args.out),
            args.items,
            args.chains,
            args.batch,
            args.seed,
            args.max_new_tokens,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
