"""Attention kernels alone, forward + backward, on the packed batches of benchmarks/gpu_step.py (one CUDA GPU).

    python benchmarks/attention.py [--rows 16] [--heads 12] [--mask-block 128] [--kernels a,b] [--pairwise]
                                   [--json out.json]

Per mask (full causal, text documents, mixed documents with bidirectional images) and kernel (SDPA's cuDNN,
flash and memory-efficient kernels; flex_attention with several tile settings and, where FlashAttention-4 is
installed, its backend; torch's varlen flash kernel and FlashAttention-4's where the mask is causal within
documents): milliseconds per layer and the useful TFLOP/s, counting only the allowed (query, key) pairs, 4 * D
FLOPs each forward and 10 * D forward + backward.

--pairwise adds each flex kernel run with the mask rule written pairwise (same document id and image id for
query and key, as the rule is defined) instead of the model's interval form, on the same block mask.
--check adds each kernel's largest absolute error in the output and in dq, dk, dv against fp32 math attention
under the dense mask (a fast kernel that computes something else is no option).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.gpu_step import synthetic_batch, tiles, timed
from model import attention
from model.attention import AttentionMask

FLEX_OPTIONS = {
    "flex": None,
    "flex-m128n64": tiles(128, 64),
    "flex-m64n64": tiles(64, 64),
    "flex-m128n128-w8": tiles(128, 128, num_warps=8),
    "flex-m64n64-bwd32x64x64x32": tiles(64, 64, (32, 64, 64, 32)),
    "flex-m64n64-bwd64x64x64x64": tiles(64, 64, (64, 64, 64, 64)),
    "flex-m64n64-bwd64x128x128x64": tiles(64, 64, (64, 128, 128, 64)),
    "flex-fa4": {"BACKEND": "FLASH"},  # torch's FlashAttention-4 (CuTe DSL) backend for flex, where installed
}


def time_fwd_bwd(fn, q, k, v, reps: int = 20) -> float:
    grad = torch.randn_like(q)
    return timed(lambda: fn(q, k, v).backward(grad), reps, warmup=3) / reps


def varlen(q, k, v, mask: AttentionMask):
    from torch.nn.attention.varlen import varlen_attn

    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]
    causal = (
        {"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters else {"window_size": (-1, 0)}
    )
    out = varlen_attn(*flat, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen, **causal)
    return out.view(B, T, H, D).transpose(1, 2)


def varlen_fa4(q, k, v, mask: AttentionMask):
    """FlashAttention-4 (`pip install flash-attn-4`, CuTe DSL, Hopper and later), causal within each document."""
    from flash_attn.cute import flash_attn_varlen_func

    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]
    cu, n = mask.cu_seqlens, mask.max_seqlen
    out = flash_attn_varlen_func(*flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n, causal=True)
    out = out[0] if isinstance(out, tuple) else out
    return out.view(B, T, H, D).transpose(1, 2)


def varlen_cudnn(q, k, v, mask: AttentionMask):
    """cuDNN's ragged (packed-sequence) attention, causal within each document."""
    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, H, D) for t in (q, k, v)]
    cu, n = mask.cu_seqlens, mask.max_seqlen
    out = torch.ops.aten._cudnn_attention_forward(*flat, None, cu, cu, n, n, True, 0.0, True, False)[0]
    return out.view(B, T, H, D).transpose(1, 2)


def fwd_bwd(fn, q, k, v, grad) -> list[torch.Tensor]:
    """Output and input gradients of one call, in fp32."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]


def math_reference(q, k, v, dense: torch.Tensor, grad) -> list[torch.Tensor]:
    def fn(q, k, v):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    return fwd_bwd(fn, q.float(), k.float(), v.float(), grad.float())


def pairwise(block, doc, img, bidirectional: bool):
    """`block` with the rule as defined on (query, key) pairs, the form model.attention replaced; same tiles."""

    def allowed(b, h, q, k):
        ok = k <= q
        if bidirectional:
            ok = ok | ((img[b, q] >= 0) & (img[b, q] == img[b, k]))
        return (doc[b, q] == doc[b, k]) & ok

    out = copy.copy(block)
    out.mask_mod = allowed
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mask-block", type=int, default=attention.FLEX_BLOCK_SIZE, help="flex block-mask granularity")
    ap.add_argument("--kernels", help="comma-separated kernel names to run (default: all)")
    ap.add_argument("--masks", default="causal,text,mixed")
    ap.add_argument("--pairwise", action="store_true", help="also run flex with the pairwise form of the rule")
    ap.add_argument("--check", action="store_true", help="each kernel's error against fp32 math attention")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    attention.FLEX_BLOCK_SIZE = args.mask_block
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 64  # one compiled kernel per (mask, tile) pair; past the default 8,
    # dynamo would silently run the rest eagerly (100x slower)
    flex = torch.compile(flex_attention, dynamic=False)
    B, H, T, D = args.rows, args.heads, args.seq, args.head_dim
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    results = []
    for kind in args.masks.split(","):
        if kind == "causal":
            doc = torch.zeros(B, T, dtype=torch.long, device="cuda")
            img = torch.full_like(doc, -1)
        else:
            batch = synthetic_batch(B, T, 32768, 16, kind == "mixed")
            doc, img = batch["doc_ids"].cuda(), batch["image_ids"].cuda()
        bidirectional = kind == "mixed"
        dense = AttentionMask.build("sdpa", doc, img, bidirectional)
        pairs = dense.dense.sum().item() * H
        kernels = {}
        if kind == "causal":
            for name, backend in (
                ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ):

                def fn(q, k, v, backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

                kernels[name] = fn
        for name, backend in (
            ("sdpa-cudnn-mask", SDPBackend.CUDNN_ATTENTION),
            ("sdpa-efficient-mask", SDPBackend.EFFICIENT_ATTENTION),
        ):

            def fn(q, k, v, backend=backend, mask=dense.dense):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            kernels[name] = fn
        block = AttentionMask.build("flex", doc, img, bidirectional).block
        forms = {"": block, "-pairwise": pairwise(block, doc, img, bidirectional)} if args.pairwise else {"": block}
        for name, options in FLEX_OPTIONS.items():
            for suffix, bm in forms.items():
                kernels[name + suffix] = lambda q, k, v, options=options, bm=bm: flex(
                    q, k, v, block_mask=bm, kernel_options=options
                )
        if not bidirectional:
            flat = AttentionMask.build("flash", doc, img, False)
            kernels["varlen"] = lambda q, k, v, flat=flat: varlen(q, k, v, flat)
            kernels["varlen-cudnn"] = lambda q, k, v, flat=flat: varlen_cudnn(q, k, v, flat)
            kernels["varlen-fa4"] = lambda q, k, v, flat=flat: varlen_fa4(q, k, v, flat)
        grad = torch.randn_like(q)
        reference = math_reference(q, k, v, dense.dense, grad) if args.check else None
        for name, fn in kernels.items():
            if args.kernels and name not in args.kernels.split(","):
                continue
            try:
                dt = time_fwd_bwd(fn, q, k, v)
                row = {"mask": kind, "kernel": name, "ms": 1000 * dt, "useful_tflops": 10 * D * pairs / dt / 1e12}
                if reference:
                    got = fwd_bwd(fn, q, k, v, grad)
                    errors = [(a - b).abs().max().item() for a, b in zip(got, reference, strict=True)]
                    row["max_error"] = dict(zip(("out", "dq", "dk", "dv"), errors, strict=True))
            except Exception as e:  # a kernel that cannot run this mask or tile: report why and go on
                row = {"mask": kind, "kernel": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            row["density"] = pairs / (B * H * T * T)
            row["mask_block"] = args.mask_block
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'mask':<7} {'kernel':<22} {'ms fwd+bwd':>10} {'useful TFLOP/s':>15}  max error out/dq/dk/dv")
    for r in results:
        if "ms" in r:
            err = " / ".join(f"{e:.3g}" for e in r["max_error"].values()) if "max_error" in r else ""
            print(f"{r['mask']:<7} {r['kernel']:<22} {r['ms']:>10.3f} {r['useful_tflops']:>15.1f}  {err}")
        else:
            print(f"{r['mask']:<7} {r['kernel']:<22} {r['error'][:60]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
