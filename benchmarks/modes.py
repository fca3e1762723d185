"""Latency of one request in each reasoning mode: what a user of `python -m infer serve` waits, one request at a time.

    python benchmarks/modes.py --model runs/sft-synthesis [--data artifacts/reasoning] [--n 10] [--chains 4]
                               [--json out.json]

Held-out items of each reasoning task, asked one at a time through the chat template (greedy; Contemplating's
chains at temperature 1, seeded), on CUDA when there is one. Prints per mode the median and mean seconds a request
and the tokens it wrote (Contemplating: all chains and the synthesis).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from data.chat import MODES, ChatTokens
from data.images import ImageSpec
from data.tokenizer import Tokenizer
from evals.reasoning import ReasoningTask, user_turn
from infer.__main__ import resolve_model
from infer.engine import Engine, SamplingParams
from infer.modes import contemplate, prompt, stop_ids
from model import load_pretrained


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="artifacts/reasoning")
    ap.add_argument("--n", type=int, default=10, help="held-out items per task")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    export = resolve_model(args.model)
    model = load_pretrained(export, device)
    tok = Tokenizer(export / "tokenizer.model")
    engine, t, cfg = Engine(model), ChatTokens.of(tok), model.cfg
    spec = ImageSpec(cfg.patch_size, cfg.max_image_patches)
    greedy = SamplingParams(args.max_new_tokens, stop_ids=stop_ids(t))
    items = [
        it for name in ("count", "twohop", "digitsum", "arith") for it in ReasoningTask(name).items(args.data, args.n)
    ]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = {m: {"seconds": [], "tokens": []} for m in MODES}
    with torch.inference_mode():
        engine.generate([prompt(user_turn(items[0], spec), tok, "thinking", cfg)], greedy)  # warm-up
        for k, it in enumerate(items):
            for mode in MODES:
                sync()
                t0 = time.perf_counter()
                if mode == "contemplating":
                    params = SamplingParams(args.max_new_tokens, 1.0, 1.0, 0, stop_ids(t), k)
                    c = contemplate(engine, tok, user_turn(it, spec), args.chains, params)
                    (final,) = engine.generate([c.synthesis_prompt], greedy)
                    tokens = c.chain_tokens + len(final)
                else:
                    (ids,) = engine.generate([prompt(user_turn(it, spec), tok, mode, cfg)], greedy)
                    tokens = len(ids)
                sync()
                rows[mode]["seconds"].append(time.perf_counter() - t0)
                rows[mode]["tokens"].append(tokens)
    summary = {
        mode: {
            "requests": len(r["seconds"]),
            "median_s": statistics.median(r["seconds"]),
            "mean_s": statistics.fmean(r["seconds"]),
            "mean_tokens": statistics.fmean(r["tokens"]),
        }
        for mode, r in rows.items()
    }
    print(f"{'mode':<14} {'requests':>8} {'median s':>9} {'mean s':>8} {'tokens':>7}   ({device.type})")
    for mode, s in summary.items():
        print(f"{mode:<14} {s['requests']:>8} {s['median_s']:>9.3f} {s['mean_s']:>8.3f} {s['mean_tokens']:>7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "chains": args.chains, "modes": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
