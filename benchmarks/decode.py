"""Decode throughput: infer.Engine's batched cached decoding next to the single-row loop (`model.generate`) and to
the bound set by HBM bandwidth (each step reads every weight and every row's KV cache once).

    python benchmarks/decode.py [--configs 20m,125m] [--batches 1,64,256] [--prompt 64] [--new 256]
                                [--engines engine,static,compiled] [--vocab 32768] [--hbm-gbps 4800]
                                [--set model.depth=2,...] [--json out.json] [--profile] [--stages]
                                [--repeats 1] [--triton SPAN=64,...]

Engines: `engine` (the growing cache), `static` (StaticCache: every step one shape), `compiled` (the static step
compiled with CUDA graphs, torch.compile's reduce-overhead mode; meant for a GPU), and the same attending to the
cache with other kernels (`model.attention.CACHED_KERNEL`): `compiled-flex` (flex_attention's decoding kernel, on a
GPU) and `compiled-math` (two matmuls and a softmax); `compiled-block4` and `compiled-block8` (`Engine(block=K)`: K
greedy steps captured in one graph, one replay and one host round for K tokens); `compiled-triton`
(`model.decode_attention`'s kernel, on a GPU with Triton) and `compiled-block8-triton` (both); `compiled-autotune`
and `compiled-triton-autotune` (`Engine(autotune=True)`: compiled with inductor's max-autotune). An engine keeps its
static cache, buffers and captured graphs from one call to the next of the same shapes; NAME-fresh drops them before
every call (`Engine.release`), as calls were before. --triton sets the Triton kernel's tiles and key split.

--profile runs each measured call once more under torch.profiler and adds what a decode step is made of: the device
kernels a new token costs (CPU operators on a CPU) and the few that take most of the time, with their share: where
the step's time goes when it is far from the bound; on a GPU also where it waited (`idle`: short gaps between
kernels, longer ones, and the call's time before its first and after its last kernel; all under the profiler,
which slows the host). --stages times one more call in its parts (pad, prefill, decode, read), synchronized
between them.

Random weights, random text prompts of --prompt tokens, greedy, no stop ids, so every row decodes --new tokens.
tokens/s counts new tokens over the whole call (prefill included), the mean of --repeats calls after a warm-up one.
`bound` is batch x steps over the time to read the weights (in the model's dtype) plus the KV cache at its mean
length once per step; `of bound` is the share of it reached. At batch 1 the share of the engine's greedy tokens equal
to the single-row loop's is reported (bf16 near-ties may flip one between cache layouts; the tests check equality in
fp32).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from infer.engine import Engine, SamplingParams
from model import attention, build_model, decode_attention
from model.generate import generate
from train.config import load_config

CONFIGS = {"20m": "configs/gpu-20m.yaml", "125m": "configs/gpu-125m.yaml", "study": "configs/study.yaml"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 1):
    fn()  # warm-up: kernels, allocator, autotuning
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return out, (time.perf_counter() - t) / repeats


def hbm_bound(model, batch: int, prompt: int, new: int, gbps: float) -> float:
    """New tokens per second if each decode step only read the weights and the KV cache (mean length) from HBM."""
    cfg = model.cfg
    itemsize = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * itemsize
    kv_per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize
    step_bytes = weights + batch * kv_per_position * (prompt + new / 2)
    return batch * gbps * 1e9 / step_bytes


ENGINES = {  # Engine options per variant, and the cached step's kernel (model.attention.CACHED_KERNEL): sdpa unless
    # named, as in the runs the docs cite; the engine's own default is triton (its `compiled-triton` rows)
    "engine": {},  # the growing cache
    "static": {"static": True},
    "compiled": {"compile": True},  # the static step compiled with CUDA graphs
    "compiled-flex": {"compile": True, "kernel": "flex"},  # ... attending to the cache with flex's decoding kernel
    "compiled-math": {"compile": True, "kernel": "math"},  # ... with two matmuls and a softmax
    "compiled-block4": {"compile": True, "block": 4},  # four greedy steps a graph replay: a quarter of the host rounds
    "compiled-block8": {"compile": True, "block": 8},
    "compiled-triton": {"compile": True, "kernel": "triton"},  # model.decode_attention: one program a row and head
    "compiled-block8-triton": {"compile": True, "block": 8, "kernel": "triton"},  # both levers at once
    "compiled-autotune": {"compile": True, "autotune": True},  # inductor's max-autotune: matmuls tuned, fused
    "compiled-triton-autotune": {"compile": True, "autotune": True, "kernel": "triton"},
}
# any engine with "-fresh": its held cache, buffers and graphs dropped before every call (`Engine.release`), as every
# call was before the engine kept them: each call allocates its cache and captures its graphs again


def profile_call(fn, device, steps: int, top: int = 8) -> dict:
    """One call of `fn` under torch.profiler: kernels (on a CPU: operators, nested ones included) per decode step,
    and the `top` ones by their own time, each as milliseconds a step and a share of the total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall_ms = (time.perf_counter() - t) * 1e3
    events = [e for e in prof.events() if (e.device_type.name == "CUDA") == cuda]
    own = [(e.name, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3) for e in events]
    totals: dict[str, float] = {}
    for name, ms in own:
        totals[name] = totals.get(name, 0.0) + ms
    total = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    out = {
        "profiled": "cuda kernels" if cuda else "cpu operators",
        "per_step": len(events) / steps,
        "ms_per_step": total / steps,  # all of them: on a GPU, the kernel time a new token costs
        "top": [{"name": n[:120], "ms_per_step": ms / steps, "share": ms / total} for n, ms in ranked],
    }
    if cuda and events:
        out.update(idle(sorted((e.time_range.start, e.time_range.end) for e in events), wall_ms, steps))
    return out


def idle(spans: list[tuple[float, float]], wall_ms: float, steps: int, short_us: float = 20.0) -> dict:
    """Where the GPU waited during a call, from its kernels' (start, end) in microseconds: gaps between kernels of
    at most `short_us` (a graph's kernel-to-kernel latency) and longer ones (the host: captures, syncs, Python),
    and the call's wall time outside the first and last kernel (prompt padding, results copied to the host)."""
    short = long = 0.0
    end = spans[0][1]
    for a, b in spans[1:]:
        if a > end:
            gap = a - end
            short, long = (short + gap, long) if gap <= short_us else (short, long + gap)
        end = max(end, b)
    span_ms = (end - spans[0][0]) / 1e3
    return {
        "wall_ms_per_step": wall_ms / steps,
        "gaps_short_ms_per_step": short / 1e3 / steps,
        "gaps_long_ms_per_step": long / 1e3 / steps,
        "outside_ms_per_step": max(0.0, wall_ms - span_ms) / steps,
    }


def bench(
    config,
    overrides,
    vocab: int,
    batches,
    prompt: int,
    new: int,
    gbps: float,
    device,
    engines=("engine",),
    emit=None,
    profile: bool = False,
    stages: bool = False,
    repeats: int = 1,
) -> list[dict]:
    """One row per engine and batch; `emit` sees each as it is measured (a run cut short keeps what it printed)."""
    # random prompts: no tokenizer is read (nor checked against the vocabulary)
    cfg = load_config(config, [f"model.vocab_size={vocab}", "data.tokenizer=none", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    params = SamplingParams(max_new_tokens=new)
    g = torch.Generator().manual_seed(0)

    def prompts(n):
        return [{"tokens": torch.randint(4, vocab, (1, prompt), generator=g)} for _ in range(n)]

    one = prompts(1)[0]
    row = {k: v.to(device) for k, v in one.items()}
    single, t_single = timed(lambda: generate(model, row, new), device)
    loop_tps = new / t_single
    results, kernel = [], attention.CACHED_KERNEL
    for name in engines:
        try:  # one engine that fails (a compile error on a new GPU stack) leaves the others' numbers standing
            options = dict(ENGINES[name.removesuffix("-fresh")])
            attention.CACHED_KERNEL = options.pop("kernel", "sdpa")
            engine = Engine(model, check_every=1 << 30, **options)
            fresh = name.endswith("-fresh")
            g.manual_seed(0)  # the same prompts for every engine
            for b in batches:
                batch = [one] if b == 1 else prompts(b)

                def call(batch=batch, engine=engine, fresh=fresh):
                    if fresh:
                        engine.release()
                    return engine.generate(batch, params)

                out, t = timed(call, device, repeats)
                row_ = _row(config, name, b, b * new / t, loop_tps, hbm_bound(model, b, prompt, new, gbps), model)
                if b == 1:  # bf16 near-ties may flip a token between cache layouts: counted, not fatal
                    same = sum(x == y for x, y in zip(out[0], single.tokens, strict=False))
                    row_["greedy_match"] = same / max(1, len(single.tokens))
                if stages:  # one more call, synchronized between its parts
                    parts: dict = {}
                    engine.generate(batch, params, stages=parts)
                    row_["stages_ms"] = {k: v * 1e3 for k, v in parts.items()}
                if profile:
                    row_["profile"] = profile_call(call, device, new)
                results.append(row_)
                emit and emit(row_)
        except Exception as e:  # noqa: BLE001
            results.append({"config": config, "engine": name, "error": f"{type(e).__name__}: {e}"[:500]})
            emit and emit(results[-1])
    attention.CACHED_KERNEL = kernel
    return results


def _row(config, engine, b, tps, loop_tps, bound, model) -> dict:
    return {
        "config": config,
        "engine": engine,
        "batch": b,
        "tokens_per_s": tps,
        "single_row_loop_tokens_per_s": loop_tps,
        "vs_loop": tps / loop_tps,
        "bound_tokens_per_s": bound,
        "of_bound": tps / bound,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(next(model.parameters()).device),
    }


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['config']:28s} {r['engine']:9s} failed: {r['error']}", flush=True)
        return
    print(
        f"{r['config']:28s} {r['engine']:9s} {r['batch']:5d} {r['tokens_per_s']:10.4g} {r['vs_loop']:7.2f} "
        f"{r['bound_tokens_per_s']:10.4g} {r['of_bound']:8.2%}"
        + (f"  greedy tokens as the loop's: {r['greedy_match']:.0%}" if "greedy_match" in r else ""),
        flush=True,
    )
    if "stages_ms" in r:
        print("    a call's parts (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_ms"].items()), flush=True)
    if "profile" in r:
        p = r["profile"]
        print(f"    {p['per_step']:.1f} {p['profiled']} a step, {p['ms_per_step']:.3f} ms; the most time:", flush=True)
        if "wall_ms_per_step" in p:
            print(
                f"    a step's wall {p['wall_ms_per_step']:.3f} ms: kernels {p['ms_per_step']:.3f}, gaps of <=20 us "
                f"{p['gaps_short_ms_per_step']:.3f}, longer gaps {p['gaps_long_ms_per_step']:.3f}, before the first "
                f"and after the last kernel {p['outside_ms_per_step']:.3f}",
                flush=True,
            )
        for t in p["top"]:
            print(f"      {t['share']:6.1%} {t['ms_per_step']:8.4f} ms  {t['name']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="20m,125m")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768, help="as benchmarks/gpu_step.py")
    ap.add_argument("--hbm-gbps", type=float, default=4800.0, help="the H200's HBM3e: 4.8 TB/s")
    ap.add_argument("--set", default="", help="config overrides, comma-separated (e.g. model.depth=2)")
    ap.add_argument("--engines", default="engine", help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="what a decode step is made of (torch.profiler)")
    ap.add_argument("--stages", action="store_true", help="a call's time by part: pad, prefill, decode, read")
    ap.add_argument("--repeats", type=int, default=1, help="calls timed after the warm-up one (their mean)")
    ap.add_argument(
        "--triton",
        default="",
        help="model.decode_attention's settings, e.g. SPAN=64,BLOCK=32,num_warps=4 (benchmarks/decode_tiles.py)",
    )
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for item in filter(None, args.triton.split(",")):
        key, value = item.split("=")
        if key in ("SPAN", "BLOCK"):
            setattr(decode_attention, key, int(value))
        else:
            decode_attention.LAUNCH[key] = int(value)
    overrides = [s for s in args.set.split(",") if s]
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"{'config':28s} {'engine':9s} {'batch':>5s} {'tokens/s':>10s} {'x loop':>7s} {'bound':>10s} {'of bound':>8s}",
        flush=True,
    )
    rows = []

    def emit(r: dict) -> None:  # the JSON rewritten at each row: a call cut short by a time limit keeps its rows
        print_row(r)
        rows.append(r)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    for name in args.configs.split(","):
        config = CONFIGS.get(name, name)
        engines = args.engines.split(",")
        bench(config, overrides, args.vocab, batches, args.prompt, args.new, args.hbm_gbps, device, engines, emit,
              args.profile, args.stages, args.repeats)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
