"""Time the real training step (DeepSpeed engine, bf16) on one CUDA GPU, next to a plain reference GPT step.

    python benchmarks/gpu_step.py [--configs 20m,125m] [--steps 30] [--json out.json]

Per config: tokens/s, MFU (6N + attention FLOPs over the GPU's dense bf16 peak) and peak memory, on synthetic
in-memory batches laid out and packed by the real data code: text-only packed documents, and mixed packed rows
(images of 16x16 patches framed in captions, document masks); per attention backend and compile on/off. The
reference is a minimal GPT of the same width, depth and vocabulary (RMSNorm, GELU MLP, causal SDPA, compiled,
fused AdamW, bf16 autocast, no DeepSpeed), so every figure has a ratio next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.layout import SpecialIds, layout_document
from data.packing import Packer, collate
from model import flops_per_token
from train.config import load_config
from train.metrics import peak_flops

SPECIAL = SpecialIds(pad=0, bos=2, eos=3, img_start=4, img_end=5, row_sep=6, patch=7)
CONFIGS = {"20m": ("configs/gpu-20m.yaml", 16), "125m": ("configs/gpu-125m.yaml", 8)}  # config, rows per batch


def synthetic_batch(rows: int, seq: int, vocab: int, patch: int, mixed: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    packer = Packer(seq, SPECIAL.pad, 3 * patch * patch)
    out = []
    while len(out) < rows:
        text = rng.integers(16, vocab, int(rng.integers(20, 600))).tolist()
        segments = [text]
        if mixed:
            side = patch * int(rng.integers(8, 17))  # 64 to 256 patches per image
            segments = [rng.standard_normal((3, side, side)).astype(np.float32), text[:40]]
        out += packer.add(layout_document(segments, SPECIAL, patch, "mrope"))
    return collate(out[:rows])


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens, targets):
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x)
        return F.cross_entropy(self.head(self.norm(x)).flatten(0, 1).float(), targets.flatten())


def timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_engine(
    cfg_path: str, rows: int, backend: str, compile_: bool, mixed: bool, steps: int, vocab: int, profile: bool = False
):
    import deepspeed

    from train.engine import build_engine

    cfg = load_config(
        cfg_path,
        [
            f"model.attention_backend={backend}",
            f"deepspeed.compile={str(compile_).lower()}",
            f"data.batch_size={rows}",
            "deepspeed.zero_stage=1",
            f"model.vocab_size={vocab}",
        ],
    )
    deepspeed.init_distributed(dist_backend="nccl")
    torch.manual_seed(0)
    engine, _, model = build_engine(cfg, torch.device("cuda"))
    T = cfg.data.seq_len
    batch = {k: v.cuda() for k, v in synthetic_batch(rows, T, vocab, cfg.model.patch_size, mixed).items()}
    model.check_inputs = False

    def step():
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()

    torch.cuda.reset_peak_memory_stats()
    dt = timed(step, steps, warmup=8 if compile_ else 3)
    tps = steps * rows * T / dt
    peak = peak_flops(torch.device("cuda"), True)
    if profile:  # where the step's GPU time goes: the top kernels by total CUDA time over 3 steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
    result = {
        "tokens_per_s": tps,
        "mfu": flops_per_token(cfg.model, T) * tps / peak,
        "memory_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
    return result, cfg


def bench_reference(cfg, rows: int, steps: int, vocab: int) -> dict:
    mc, T = cfg.model, cfg.data.seq_len
    model = torch.compile(RefGPT(vocab, mc.d_model, mc.n_layers, mc.n_heads).cuda())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, vocab, (rows, T + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, steps, warmup=8)
    n = sum(p.numel() for p in model.parameters()) - vocab * mc.d_model
    tps = steps * rows * T / dt
    return {"tokens_per_s": tps, "mfu": (6 * n + 12 * mc.n_layers * mc.d_model * T) * tps / 989e12, "params": n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="20m,125m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument(
        "--variants", default="sdpa:compile:text,flex:compile:text,flex:compile:mixed,sdpa:eager:mixed,flex:eager:mixed"
    )
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each variant")
    args = ap.parse_args(argv)
    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555",
    }.items():
        os.environ.setdefault(k, v)
    results = []
    for name in args.configs.split(","):
        path, rows = CONFIGS[name]
        cfg = None
        for variant in args.variants.split(","):
            backend, mode, kind = variant.split(":")
            r, cfg = bench_engine(
                path, rows, backend, mode == "compile", kind == "mixed", args.steps, args.vocab, args.profile
            )
            torch.cuda.empty_cache()  # the previous engine is garbage once bench_engine returns
            results.append({"config": name, "backend": backend, "compile": mode == "compile", "batch": kind, **r})
            print(json.dumps(results[-1]), flush=True)
        ref = bench_reference(cfg, rows, args.steps, args.vocab)
        results.append({"config": name, "backend": "reference-gpt", "compile": True, "batch": "text", **ref})
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'config':<6} {'backend':<14} {'compile':<7} {'batch':<6} {'tokens/s':>10} {'MFU':>6} {'vs ref':>7}")
    for r in results:
        ref = next(x for x in results if x["config"] == r["config"] and x["backend"] == "reference-gpt")
        print(
            f"{r['config']:<6} {r['backend']:<14} {str(r['compile']):<7} {r['batch']:<6} {r['tokens_per_s']:>10.0f} "
            f"{r['mfu']:>6.1%} {r['tokens_per_s'] / ref['tokens_per_s']:>7.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
