"""The cached step's attention alone (`model.decode_attention`'s Triton kernel) at a decode batch's shapes, over its
settings (keys a part when a row's keys are split over several programs, keys a loop iteration, warps), next to
cuDNN's SDPA over the same view with a mask (what the compiled engine runs by default) and to the time reading the
keys and values once at HBM bandwidth takes.

    python benchmarks/decode_tiles.py [--batches 256,64] [--heads 3] [--head-dim 128] [--view 320] [--end 192]
                                      [--hbm-gbps 4800] [--json out.json]

Defaults: the 20M config half-way through benchmarks/decode.py's decode (64-token prompts, 256 new tokens: keys
written 192 of a 320-long buffer). Each setting is timed through the op a compiled step calls (the split's combine
included), with triton.testing.do_bench. Needs a CUDA GPU with Triton.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from model import decode_attention as da

SETTINGS = list(itertools.product((0, 32, 64, 128), (32, 64), (2, 4, 8)))  # SPAN, BLOCK, num_warps


def sweep(B: int, H: int, D: int, L: int, ends: int, gbps: float) -> list[dict]:
    """Every setting at batch B (and SDPA), timed; the module's settings are left as they were."""
    import triton.testing

    dev = torch.device("cuda")
    q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    key_start = torch.zeros(B, dtype=torch.long, device=dev)
    end = torch.tensor(ends, device=dev)
    bound_ms = 2 * B * H * ends * D * 2 / (gbps * 1e9) * 1e3  # keys and values read once
    ref = da.reference(q, k, v, key_start, end).float()
    rows = []

    def add(name, fn, **extra):
        out = fn()
        ms = triton.testing.do_bench(fn)
        err = (out.float() - ref).abs().max().item()
        rows.append({"batch": B, "kernel": name, "ms": ms, "of_bound": bound_ms / ms, "max_err": err, **extra})
        print(f"batch {B:4d}  {name:36s} {ms * 1e3:7.1f} us  {bound_ms / ms:6.1%} of the HBM bound  "
              f"max err {err:.1e}", flush=True)  # fmt: skip

    mask = da.span_mask(L, key_start, end)
    add("sdpa (masked view)", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    kept = da.SPAN, da.BLOCK, da.LAUNCH
    try:
        for span, block, warps in SETTINGS:
            da.SPAN, da.BLOCK, da.LAUNCH = span, block, {"num_warps": warps, "num_stages": 2}
            name = f"triton SPAN={span} BLOCK={block} warps={warps}"
            try:
                add(name, lambda: da._decode_op(q, k, v, key_start, end), span=span, block=block, num_warps=warps)
            except Exception as e:  # noqa: BLE001  (out of shared memory or registers at this setting)
                print(f"batch {B:4d}  {name}: {type(e).__name__}", flush=True)
    finally:
        da.SPAN, da.BLOCK, da.LAUNCH = kept
    best = min((r for r in rows if "span" in r), key=lambda r: r["ms"])
    print(f"batch {B}: best {best['kernel']} {best['ms'] * 1e3:.1f} us, {best['of_bound']:.1%} of the bound "
          f"({bound_ms * 1e3:.1f} us)", flush=True)  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="256,64")
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--view", type=int, default=320)
    ap.add_argument("--end", type=int, default=192)
    ap.add_argument("--hbm-gbps", type=float, default=4800.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        rows += sweep(B, args.heads, args.head_dim, args.view, args.end, args.hbm_gbps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
