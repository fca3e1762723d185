"""Time the real training step (DeepSpeed engine, bf16, train.step.TrainStep) on CUDA, next to a plain reference.

    python benchmarks/gpu_step.py [--configs 20m,125m] [--steps 30] [--variants V,V,...] [--json out.json]
    torchrun --nproc_per_node=2 benchmarks/gpu_step.py ...   # data-parallel: tokens/s per GPU

A variant is a colon-separated set of words, in any order (defaults in brackets):
  attention  flex | sdpa | sdpa-cudnn | sdpa-efficient | flash   [flex]   (sdpa: torch picks the kernel)
  compile    compile | eager                                      [compile]
  batch      text | mixed                                         [text]   (packed documents with document masks;
             mixed rows hold images of 64 to 256 patches of 16 px, each framed by a caption)
  ZeRO       z0 | z1 | z2 | z3                                    [z1]
  ac         activation checkpointing on                          [off]
  data       synthetic | loader | cached                          [synthetic] (loader: the real StreamingLoader
             over --data, pinned and copied on a stream of its own as the trainer does (data.handoff.SideCopy;
             samestream: on the compute stream, as before), or with @data.rows=DIR the rows gathered from that row
             store, `python -m data.rows`; cached: its first 8 batches kept on the GPU;
             fd: workers pass tensors by file descriptor, torch's default, not named shared memory as the loader does)
  plain      our model with fused AdamW and autocast but no DeepSpeed (to measure the engine's own cost)
  graph      the step captured once as a CUDA graph and replayed (deepspeed.cuda_graph, train.graphed_step; implies
             torchengine): batches of one shape, the output head at the target index's room (index_room)
  torchengine  the trainer's own one-process engine (train.engine.TorchEngine: what `deepspeed.engine=auto` runs
             on one GPU) with train.step, instead of DeepSpeed's
  whole      compile the whole model as one graph instead of block by block
  waits      DeepSpeed's ZeRO-1/2 step as shipped, with its host waits (train.zero_waits not applied)
  allpositions  the output head and loss at every position, as before round 7 (batches without target_index)
  torchloss  the loss through autograd (compiled) instead of model.cross_entropy's kernel, as before round 7
  losskernel model.cross_entropy's kernel also with @deepspeed.compile_scope=model (which turns it off: a graph break)
  torchmlp   the MLP in torch's ops (matmuls, then SwiGLU) where QuACK's fused GEMMs are installed (model.mlp)
  quackmlp   QuACK's fused MLP wherever it runs: below model.mlp.MIN_WIDTH (the 20M config's width) and under
             activation checkpointing, where train.engine keeps torch's MLP (not with z3, which it breaks)
  mlptuned   QuACK's GEMMs autotuned per shape (model.mlp.TUNED)
  rows=N     packed rows per micro-batch                          [the config's data.batch_size]
  amp        fp32 weights under torch.autocast (DeepSpeed's torch_autocast) instead of bf16 weights
  tiles=MxN[/M1xN1xM2xN2]  flex kernel tiles for the config's head dim, forward [and backward] (tiles=torch:
                           torch's defaults; with heads of 16 give mask=128 too: tiles may not exceed the mask's);
                                                                  mask=N: block-mask granularity
                                                                  [model.attention's]
  loss=BxW   model.cross_entropy's kernel launch: vocabulary block B, W warps      [its MAX_BLOCK x NUM_WARPS]
  @KEY=VALUE any config override, e.g. @deepspeed.grad_clip=0

--set KEY=VALUE[,KEY=VALUE] applies overrides to every variant and to the reference (e.g. model.head_dim=128).

Per variant: tokens/s (per GPU), MFU (6N + attention FLOPs over the GPU's dense bf16 peak, the output head counted
at every position), MFU run (the same with the head counted only at the positions where it runs: those with a text
target, unless `allpositions`) and peak memory.
Per config and row count, a plain reference GPT of the same width, depth, heads and vocabulary (RMSNorm, GELU MLP,
causal SDPA, compiled, fused AdamW, bf16 autocast, no DeepSpeed) on the same number of tokens, so every figure has
a ratio next to it (--bracket: measured before the variants as well as after, the ratio against the faster of
the two: at depth 8 of the study the reference gave 4.36M to 5.80M tokens/s in four calls on one H200 host,
docs/study/STUDY.md). Loader variants add the host's time per step in next(loader) and in the copies to the GPU
(`loader_wait_ms`, `copy_ms`): a loader that costs tokens/s with neither is slowing the trainer's host, not
starving it. --profile adds, per variant and reference, the GPU's busy share of the step, the kernels a step
launches, the top kernels and host ops, and the Python functions the host spends its time in (--trace DIR: Chrome
traces); --syncs, the call sites where one step makes the host wait for the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data import handoff
from data.layout import SpecialIds, layout_document
from data.packing import Packer, collate
from model import attention, cross_entropy, flops_per_token, mlp
from train.config import load_config
from train.metrics import peak_flops

SPECIAL = SpecialIds(pad=0, bos=2, eos=3, img_start=4, img_end=5, row_sep=6, patch=7)
CONFIGS = {"20m": "configs/gpu-20m.yaml", "125m": "configs/gpu-125m.yaml", "study": "configs/study.yaml"}
ATTENTION = {"flex", "sdpa", "sdpa-cudnn", "sdpa-efficient", "flash"}
AMP = ["deepspeed.autocast=true"]
FLEX_DEFAULTS = (attention.FLEX_KERNEL_OPTIONS, None)  # each variant starts from these (None: the model's granularity)
MASK_DEFAULTS = (attention.FLEX_BLOCK_SIZE, dict(attention.FLEX_BLOCK_SIZE_BY_HEAD))
LOSS_LAUNCH = (cross_entropy.MAX_BLOCK, cross_entropy.NUM_WARPS)  # and the loss kernel's launch
MLP_MIN_WIDTH = mlp.MIN_WIDTH


def tiles(m: int, n: int, backward: tuple[int, int, int, int] | None = None, **extra) -> dict:
    """flex kernel options: forward tiles M x N, and optionally the backward's (M1, N1, M2, N2)."""
    bwd = dict(zip(("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"), backward, strict=True)) if backward else {}
    return {"BLOCK_M": m, "BLOCK_N": n, **bwd, **extra}


def parse_variant(text: str) -> dict:
    v = {"attention": "flex", "compile": True, "batch": "text", "zero": 1, "ac": False, "data": "synthetic"}
    v.update(fd=False, plain=False, whole=False, waits=False, allpositions=False, torchloss=False, rows=None)
    v.update(torchmlp=False, quackmlp=False, mlptuned=False, torchengine=False, losskernel=False, graph=False)
    v.update(samestream=False, name=text, overrides=[])
    v["tiles"], v["mask_block"] = FLEX_DEFAULTS
    v["loss_launch"] = LOSS_LAUNCH
    for word in text.split(":"):
        if word in ATTENTION:
            v["attention"] = word
        elif word in ("compile", "eager"):
            v["compile"] = word == "compile"
        elif word in ("text", "mixed"):
            v["batch"] = word
        elif word in ("z0", "z1", "z2", "z3"):
            v["zero"] = int(word[1])
        elif word in (
            "ac",
            "plain",
            "whole",
            "waits",
            "allpositions",
            "torchloss",
            "torchmlp",
            "quackmlp",
            "mlptuned",
            "torchengine",
            "losskernel",
            "samestream",  # the loader's copies on the compute stream, as before data.handoff.SideCopy
        ):
            v[word] = True
        elif word == "fd":  # workers pass tensors by file descriptor (torch's default) instead of the trainer's way
            v["fd"] = True
        elif word in ("synthetic", "loader", "cached"):
            v["data"] = word
        elif word == "graph":  # the step captured as a CUDA graph (train.graphed_step): the torch engine's
            v["torchengine"] = v["graph"] = True
            v["overrides"] += ["deepspeed.cuda_graph=true", "logging.telemetry_every=0"]
        elif word.startswith("rows="):
            v["rows"] = int(word[5:])
        elif word == "amp":  # fp32 weights under torch.autocast in the DeepSpeed engine, instead of bf16 weights
            v["overrides"] += AMP
        elif word.startswith("@"):
            v["overrides"].append(word[1:])
        elif word.startswith("tiles="):  # flex kernel tiles: forward MxN, optionally /M1xN1xM2xN2 for the backward
            fwd, _, bwd = word[6:].partition("/")
            if fwd == "torch":  # torch's own defaults
                v["tiles"] = None
                continue
            v["tiles"] = tiles(*map(int, fwd.split("x")), tuple(map(int, bwd.split("x"))) if bwd else None)
        elif word.startswith("mask="):  # flex block-mask granularity
            v["mask_block"] = int(word[5:])
        elif word.startswith("loss="):  # model.cross_entropy's launch: BLOCKxWARPS
            v["loss_launch"] = tuple(int(x) for x in word[5:].split("x"))
        else:
            raise SystemExit(f"unknown variant word '{word}' in '{text}' (see --help)")
    return v


def synthetic_batch(rows: int, seq: int, vocab: int, patch: int, mixed: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    packer = Packer(seq, SPECIAL.pad, 3 * patch * patch)
    out = []
    while len(out) < rows:
        text = rng.integers(16, vocab, int(rng.integers(20, 600))).tolist()
        segments = [text]
        if mixed:
            side = patch * int(rng.integers(8, 17))  # 64 to 256 patches per image
            segments = [rng.integers(0, 256, (3, side, side), dtype=np.uint8), text[:40]]  # pixels, as loaded
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


def sdpa_context(attention: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    return sdpa_kernel([kernels[attention]]) if attention in kernels else contextlib.nullcontext()


def batches_for(v: dict, cfg, rows: int, vocab: int, data_dir: str, heads: list[float], waits: list):
    """An endless iterator of device batches for the variant. `heads` collects, per batch made, the share of its
    positions where the output head runs; `waits`, per batch the real loader streams, the seconds the trainer spent
    in next(loader) and in starting the batch's copies to the GPU."""
    dev = torch.device("cuda", torch.cuda.current_device())

    def to_device(b: dict, non_blocking: bool = False, copy=None) -> dict:
        if v["allpositions"]:
            b = {k: t for k, t in b.items() if k != "target_index"}
        # the rows the head runs at are target_index's length, padding included: read from its shape, for a CPU
        # op here (counting its entries) would cost the loader variants (train.engine.quiet_host_threads)
        heads.append(1.0 if v["allpositions"] else len(b["target_index"]) / b["tokens"].numel())
        if copy is not None:
            return copy(b)
        return handoff.to_device(b, dev, non_blocking)  # one copy where the loader handed one buffer (data.handoff)

    if v["data"] == "synthetic":
        seeds = range(dist.get_rank() * 4, dist.get_rank() * 4 + 4)
        cached = [
            synthetic_batch(rows, cfg.data.seq_len, vocab, cfg.model.patch_size, v["batch"] == "mixed", s)
            for s in seeds
        ]
        return itertools.cycle([to_device(b) for b in cached])
    from data.rows import open_loader

    # The config's own mixture (caption / interleaved / text), read from data_dir.
    moved = [replace(s, shards=s.shards.replace("artifacts/data", data_dir)) for s in cfg.data.sources]
    data_cfg = replace(cfg.data, sources=moved, tokenizer=cfg.data.tokenizer.replace("artifacts/data", data_dir))
    sharing = "file_descriptor" if v["fd"] else "file_system"
    # the streaming loader, or with `@data.rows=DIR` a row store's (`python -m data.rows`: rows gathered by threads)
    loader = open_loader(data_cfg, dist.get_rank(), dist.get_world_size(), pin_memory=True, sharing=sharing)
    if v["data"] == "cached":
        return itertools.cycle([to_device(next(loader)) for _ in range(8)])

    side = None if v["samestream"] else handoff.SideCopy(dev)  # the trainer's copy (train.next_token)

    def streamed():
        while True:
            t0 = time.perf_counter()
            b = next(loader)
            t1 = time.perf_counter()
            b = to_device(b, non_blocking=True, copy=side)
            waits.append((t1 - t0, time.perf_counter() - t1))
            yield b

    return streamed()


def mlp_kernels(model: nn.Module) -> str:
    """Which MLP path the step ran: QuACK's where every block takes it for inputs of its weights' dtype (the
    engine's bf16; `plain` and `amp` keep fp32 weights under autocast, which take torch's)."""
    blocks = [m for m in model.modules() if isinstance(m, mlp.MLP)]
    return "quack" if all(m.runs_fused(m.w_gate_up.weight.dtype) for m in blocks) else "torch"


def bench_variant(
    cfg_path: str, v: dict, steps: int, vocab: int, data_dir: str, profile: bool, sync_sites: bool, trace: str | None
):
    from train import engine as engine_module
    from train import zero_waits
    from train.engine import apply_activation_checkpointing, apply_compile, build_engine, param_groups, step_clip
    from train.graphed_step import GraphedStep
    from train.step import TrainStep

    overrides = [
        f"model.attention_backend={v['attention'].split('-')[0]}",
        f"deepspeed.compile={str(v['compile'] and not v['whole']).lower()}",
        f"deepspeed.zero_stage={v['zero']}",
        f"deepspeed.activation_checkpointing={str(v['ac']).lower()}",
        f"model.vocab_size={vocab}",
        f"deepspeed.engine={'torch' if v['torchengine'] else 'deepspeed'}",
    ]
    if v["rows"]:
        overrides.append(f"data.batch_size={v['rows']}")
    cfg = load_config(cfg_path, overrides + v["overrides"])
    cross_entropy.ENABLED = not v["torchloss"]
    mlp.FUSED, mlp.TUNED = not v["torchmlp"], v["mlptuned"]
    mlp.MIN_WIDTH = 0 if v["quackmlp"] else MLP_MIN_WIDTH
    cross_entropy.MAX_BLOCK, cross_entropy.NUM_WARPS = v["loss_launch"]
    if v["mask_block"] is None:  # the model's own granularity per head dim
        attention.FLEX_BLOCK_SIZE, attention.FLEX_BLOCK_SIZE_BY_HEAD = MASK_DEFAULTS
    else:
        attention.FLEX_BLOCK_SIZE, attention.FLEX_BLOCK_SIZE_BY_HEAD = v["mask_block"], {}
    v["mask_block"] = attention.flex_block_size(cfg.model.head_dim)  # as run, in the JSON
    attention.FLEX_KERNEL_OPTIONS = v["tiles"] if v["tiles"] is FLEX_DEFAULTS[0] else {cfg.model.head_dim: v["tiles"]}
    rows, T = cfg.data.batch_size, cfg.data.seq_len
    torch.manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device())
    heads: list[float] = []
    waits: list[tuple[float, float]] = []  # loader: seconds in next(loader) and in the copies to the GPU, per batch
    batches = batches_for(v, cfg, rows, vocab, data_dir, heads, waits)
    if v["plain"]:
        from model import build_model

        model = build_model(cfg.model).to(dev)
        if v["ac"]:
            apply_activation_checkpointing(model)
        if v["compile"]:
            model.compile(dynamic=False) if v["whole"] else apply_compile(model)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**next(batches)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

    else:
        policy = engine_module.choose_mlp_kernels
        if v["quackmlp"]:  # QuACK wherever it runs, also where the engine keeps torch's MLP (checkpointing)
            engine_module.choose_mlp_kernels = lambda model, cfg: None
        try:
            engine, optimizer, model = build_engine(cfg, dev, dist.get_world_size())
        finally:
            engine_module.choose_mlp_kernels = policy
        if v["waits"] and not v["torchengine"]:
            zero_waits.restore()
        if v["whole"]:
            model.compile(dynamic=False)
        if v["losskernel"]:  # model.cross_entropy's kernel also where compile_scope=model turns it off
            model.loss_kernel = True
        step_kind = GraphedStep if cfg.deepspeed.cuda_graph else TrainStep
        run_step = step_kind(engine, optimizer, dev, clip=step_clip(cfg, getattr(engine, "kind", "deepspeed")))
        counter = itertools.count()

        def step():
            run_step([next(batches)], next(counter))

    model.check_inputs = False
    with sdpa_context(v["attention"]):
        torch.cuda.reset_peak_memory_stats()
        dt = timed(step, steps, warmup=8 if v["compile"] else 3)
        waited = np.array(waits[-steps:]).reshape(-1, 2)  # the timed steps' batches
        # of those, when the loader streams them; else of the batches made, which cycle, each equally often
        head_share = float(np.mean(heads[-steps:] if waits else heads))
        if v["graph"]:  # the captured index's room, padding included (train.graphed_step.index_room)
            head_share = run_step.head_rows([]) / (rows * T)
        report = profile_steps(step, trace=trace) if profile else None
        if profile:
            host_profile(step)
        syncs = find_syncs(step) if sync_sites else None
    tps = steps * rows * T / dt
    flops = flops_per_token(cfg.model, T)
    flops_run = flops_per_token(cfg.model, T, head_share=head_share)
    result = {
        "tokens_per_s": tps,
        "mfu": flops * tps / peak_flops(dev, True),
        "mfu_run": flops_run * tps / peak_flops(dev, True),
        "head_share": head_share,
        "memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "rows": rows,
        "step_ms": 1000 * dt / steps,
        "mlp": mlp_kernels(model),
    }
    if len(waited):  # host time per step spent getting batches: workers behind, or copies that did not overlap
        result["loader_wait_ms"] = 1000 * waited[:, 0].mean()
        result["copy_ms"] = 1000 * waited[:, 1].mean()
    if report:  # the profiler slows the host, so the busy share is taken against the unprofiled step too
        result["profile"] = {**report, "gpu_busy_of_step": report["gpu_busy_ms_per_step"] / result["step_ms"]}
    if syncs is not None:
        result["host_syncs"] = syncs
    return result, cfg


def profile_steps(step, n: int = 3, trace: str | None = None) -> dict:
    """GPU kernel time per step and its share of the profiled steps, the kernels launched per step, and the top
    kernels and host ops (host waits: find_syncs). `trace`: also write the profiled steps as a Chrome trace there."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0, -1
    for s, e in kernels:
        busy += max(0, e - max(s, end))
        end = max(end, e)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
    if trace:
        prof.export_chrome_trace(trace)
    return {
        "kernels_per_step": len(kernels) / n,
        "wall_ms_per_step": 1000 * wall / n,
        "gpu_busy_ms_per_step": busy / 1000 / n,
        "gpu_busy_share": busy / 1e6 / wall,
    }


def host_profile(step, n: int = 20, top: int = 40) -> None:
    """Print the Python functions the host spends a step's time in (cProfile over `n` steps, by own time): for a
    host-bound step, where its milliseconds go between the kernel launches."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def find_syncs(step) -> dict:
    """Call sites of the operations that made the host wait for the GPU during one step: those CUDA's sync debug
    mode reports (a value read back, a copy from pageable memory), and explicit waits, which it does not report
    (torch.cuda.synchronize, Stream/Event.synchronize: DeepSpeed's throughput timer called the first twice a step)."""
    import traceback
    import warnings

    sites: dict[str, int] = {}

    def note(skip: int = 1):
        frames = [
            f for f in traceback.extract_stack()[:-skip] if "/torch/" not in f.filename and "warnings" not in f.filename
        ]
        key = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(frames[-5:]))
        sites[key] = sites.get(key, 0) + 1

    def record(message, *_args, **_kwargs):
        if "synchronizing CUDA operation" in str(message):  # not another warning raised meanwhile
            note(2)

    def counted(owner, name):
        original = getattr(owner, name)

        def wait(*args, **kwargs):
            note(2)
            return original(*args, **kwargs)

        return owner, name, original, wait

    explicit = [
        counted(torch.cuda, "synchronize"),
        counted(torch.cuda.Stream, "synchronize"),
        counted(torch.cuda.Event, "synchronize"),
    ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # before recording: it warns about itself ("...synchronizing operations")
    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        for owner, name, _, wait in explicit:
            setattr(owner, name, wait)
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            for owner, name, original, _ in explicit:
                setattr(owner, name, original)
    return sites


def bench_reference(cfg, rows: int, steps: int, vocab: int, profile: bool = False, trace: str | None = None) -> dict:
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
    mfu = (6 * n + 12 * mc.n_layers * mc.d_model * T) * tps / peak_flops(torch.device("cuda"), True)
    result = {"tokens_per_s": tps, "mfu": mfu, "params": n, "rows": rows, "step_ms": 1000 * dt / steps}
    if profile:
        report = profile_steps(step, trace=trace)
        result["profile"] = {**report, "gpu_busy_of_step": report["gpu_busy_ms_per_step"] / result["step_ms"]}
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="20m,125m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--variants", default="flex:text,flex:mixed,sdpa:mixed,flex:mixed:eager")
    ap.add_argument("--data", default="artifacts/data", help="embedded-format shards for the loader variants")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument(
        "--bracket",
        action="store_true",
        help="the reference also before the variants (reference-before); ratios against the faster of the two",
    )
    ap.add_argument("--set", default="", help="config overrides for every variant and the reference, comma-separated")
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="GPU busy share and top kernels per variant")
    ap.add_argument("--trace", help="with --profile: a directory for each variant's Chrome trace")
    ap.add_argument("--syncs", action="store_true", help="the call sites that make one step wait for the GPU")
    args = ap.parse_args(argv)
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", "29555")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deepspeed

    from train.engine import quiet_host_threads

    quiet_host_threads(torch.device("cuda"))

    deepspeed.init_distributed(dist_backend="nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []

    def emit(record):
        results.append(record)
        if rank == 0:
            print(json.dumps(record), flush=True)

    for name in args.configs.split(","):
        references = set()
        if args.bracket and not args.no_reference and world == 1:  # the reference before the variants too
            for rows in sorted({parse_variant(t)["rows"] for t in args.variants.split(",")}, key=str):
                cfg = load_config(CONFIGS[name], [o for o in args.set.split(",") if o])
                emit(
                    {
                        "config": name,
                        "variant": "reference-before",
                        "world": 1,
                        **bench_reference(cfg, rows or cfg.data.batch_size, args.steps, args.vocab),
                    }
                )
                torch._dynamo.reset()
        for text in args.variants.split(","):
            v = parse_variant(text)
            v["overrides"] = [o for o in args.set.split(",") if o] + v["overrides"]
            trace = f"{args.trace}/{name}-{len(results)}.json" if args.trace else None
            r, cfg = bench_variant(CONFIGS[name], v, args.steps, args.vocab, args.data, args.profile, args.syncs, trace)
            torch._dynamo.reset()
            gc.collect()  # DeepSpeed engines hold reference cycles: free the last one before the next peak
            torch.cuda.empty_cache()
            emit({"config": name, "variant": text, "world": world, **{k: v[k] for k in v if k != "name"}, **r})
            references.add(r["rows"])
        for rows in sorted(references) if not args.no_reference and world == 1 else []:
            emit(
                {
                    "config": name,
                    "variant": "reference",
                    "world": 1,
                    **bench_reference(
                        cfg,
                        rows,
                        args.steps,
                        args.vocab,
                        args.profile,
                        f"{args.trace}/{name}-reference-{rows}.json" if args.trace else None,
                    ),
                }
            )
    if rank:
        return
    print(
        f"\n{'config':<6} {'variant':<34} {'rows':>4} {'tokens/s':>10} {'MFU':>6} {'MFU run':>7} {'mem GB':>7} "
        f"{'vs ref':>7}"
    )
    for r in results:
        ref = next(
            (
                x
                for x in results
                if x["variant"] == "reference" and (x["config"], x["rows"]) == (r["config"], r["rows"])
            ),
            None,
        )
        before = [
            x
            for x in results
            if x["variant"] == "reference-before" and (x["config"], x["rows"]) == (r["config"], r["rows"])
        ]
        if ref and before and r is not ref and r not in before:  # against the faster of the two: the harder bar
            ref = max([ref, *before], key=lambda x: x["tokens_per_s"])
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:>7.2f}" if ref else f"{'-':>7}"
        mem = f"{r['memory_gb']:>7.1f}" if "memory_gb" in r else f"{'-':>7}"
        print(
            f"{r['config']:<6} {r['variant']:<34} {r['rows']:>4} {r['tokens_per_s']:>10.0f} {r['mfu']:>6.1%} "
            f"{r.get('mfu_run', r['mfu']):>7.1%} {mem} {ratio}"
            + (f"  waits {r['loader_wait_ms']:.2f} + {r['copy_ms']:.2f} ms/step" if "loader_wait_ms" in r else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
