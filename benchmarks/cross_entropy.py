"""The loss kernel of model.cross_entropy alone (one CUDA GPU): its launch choices against an in-place copy's rate.

    python benchmarks/cross_entropy.py [--rows 131072] [--vocab 32768] [--launches 8192x8,16384x16] [--json out.json]

The kernel reads each row of a (rows, vocab) bf16 logits buffer twice (the log-sum-exp, then the gradient; the
second read mostly from L2) and overwrites it with the loss's gradient, so at least one read and one write of every
entry go to memory. Per launch (block x warps): milliseconds and the rate counting those bytes, next to torch's
in-place multiply over the same buffer, the same bytes moved by a plain element-wise kernel.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.gpu_step import timed
from model import cross_entropy


def launch_rate(logits, targets, block: int, warps: int, reps: int) -> float:
    """Milliseconds per call of the rows kernel with this launch."""
    cross_entropy.MAX_BLOCK, cross_entropy.NUM_WARPS = block, warps
    n = (targets != cross_entropy.IGNORE).sum()
    return 1000 * timed(lambda: cross_entropy._rows_triton(logits, targets, n, 1e-4), reps, warmup=3) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=131072, help="rows of logits (20M text: 64 x 2048)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--launches", default="8192x8,8192x16,16384x8,16384x16,16384x32", help="BLOCKxWARPS,...")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.rows,), device="cuda")
    moved = 2 * logits.numel() * logits.element_size()  # read once, written once
    copy_ms = 1000 * timed(lambda: torch.mul(logits, 1.0, out=logits), args.reps, warmup=3) / args.reps
    results = [{"launch": "in-place multiply", "ms": copy_ms, "tb_per_s": moved / copy_ms / 1e9}]
    saved = cross_entropy.MAX_BLOCK, cross_entropy.NUM_WARPS
    try:
        for launch in args.launches.split(","):
            block, warps = (int(x) for x in launch.split("x"))
            ms = launch_rate(logits, targets, block, warps, args.reps)
            results.append({"launch": launch, "ms": ms, "tb_per_s": moved / ms / 1e9})
    finally:
        cross_entropy.MAX_BLOCK, cross_entropy.NUM_WARPS = saved
    print(f"{args.rows} x {args.vocab} bf16 logits, {moved / 1e9:.2f} GB moved per call")
    print(f"{'launch':<18} {'ms':>7} {'TB/s':>6}")
    for r in results:
        print(f"{r['launch']:<18} {r['ms']:>7.3f} {r['tb_per_s']:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "vocab": args.vocab, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
