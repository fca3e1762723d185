"""The SwiGLU MLP of model.mlp alone (one CUDA GPU): QuACK's fused GEMMs against torch's ops, compiled.

    python benchmarks/mlp.py [--shapes 131072x384x1024,65536x768x2048] [--json out.json]

Per shape (tokens x width x hidden; the defaults are the 20M and 125M text steps' micro-batches): milliseconds for
forward + backward of one MLP in bf16, the TFLOP/s of its six matmuls at that time, and each path's largest error
against the same MLP in fp32 (output, input gradient, both weight gradients, relative to the fp32 value's largest
magnitude). The torch path is compiled, as the training step's blocks are, so it gets inductor's fused SwiGLU.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.gpu_step import timed
from model import mlp


def run(m: mlp.MLP, x: torch.Tensor, g: torch.Tensor, fused: bool, forward):
    mlp.FUSED = fused
    m.zero_grad(set_to_none=True)
    x.grad = None
    out = forward(x)
    out.backward(g)
    return out, x.grad, m.w_gate_up.weight.grad, m.w_down.weight.grad


def errors(got, want) -> list[float]:
    return [float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(got, want, strict=True)]


def measure(n: int, d: int, hidden: int, reps: int) -> dict:
    torch.manual_seed(0)
    m32 = mlp.MLP(d, hidden).cuda()
    for p in m32.parameters():
        torch.nn.init.normal_(p, std=0.02)
    m = mlp.MLP(d, hidden).cuda().bfloat16()
    m.load_state_dict(m32.state_dict())
    x32 = torch.randn(n, d, device="cuda", requires_grad=True)
    g32 = torch.randn(n, d, device="cuda") / n**0.5
    x, g = x32.detach().bfloat16().requires_grad_(), g32.bfloat16()
    want = run(m32, x32, g32, False, m32)
    row = {"tokens": n, "width": d, "hidden": hidden}
    flop = 18 * n * d * hidden  # gate-up (d -> 2 hidden) and down (hidden -> d), forward and backward
    for name, fused, forward in (("quack", True, m), ("torch compiled", False, torch.compile(m, dynamic=False))):
        row[f"{name} error"] = errors(run(m, x, g, fused, forward), want)
        ms = 1000 * timed(lambda: run(m, x, g, fused, forward), reps, warmup=3) / reps  # noqa: B023 (called here)
        row[f"{name} ms"], row[f"{name} tflops"] = ms, flop / ms / 1e9
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="131072x384x1024,65536x768x2048", help="TOKENSxWIDTHxHIDDEN,...")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tuned", action="store_true", help="QuACK's autotuning (model.mlp.TUNED)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not mlp.fused_available():
        raise SystemExit("QuACK's fused MLP is not available here (needs quack-kernels and a GPU of sm_90 or later)")
    mlp.TUNED = args.tuned
    results = []
    try:
        for shape in args.shapes.split(","):
            row = measure(*(int(s) for s in shape.split("x")), args.reps)
            results.append(row)
            errs = {k: ", ".join(f"{e:.1e}" for e in row[f"{k} error"]) for k in ("quack", "torch compiled")}
            print(
                f"{shape}: quack {row['quack ms']:.3f} ms ({row['quack tflops']:.0f} TFLOP/s), torch compiled "
                f"{row['torch compiled ms']:.3f} ms ({row['torch compiled tflops']:.0f}); largest errors against "
                f"fp32 (out, dx, dw_gate_up, dw_down): quack {errs['quack']}; torch {errs['torch compiled']}"
            )
    finally:
        mlp.FUSED, mlp.TUNED = True, False
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tuned": args.tuned, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
