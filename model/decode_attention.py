"""One query a row against a static KV cache, in one Triton program per (row, head): the cached step's attention.

Why: at batch 256 a 20M decode step spends 0.19 ms of its 0.40 ms of kernels in cuDNN's attention, about twice the
time reading the cache's keys and values once at HBM bandwidth would take; its tiles hold 16 queries and a decode
row has one (docs/PERFORMANCE.md). Here a program holds its row's one query, walks the cache's keys in blocks with
an online softmax, and loads only the keys the row may read, [key_start, end): the left padding and the unwritten
rest of the view are masked out of the loads, so they cost no memory traffic. The loop runs over the view, a number
the host knows, so the kernel reads no bound from the device and a CUDA graph replays it as it was captured.
Registered with `torch.library.triton_op`, so a compiled step keeps it in its graph. Elsewhere (a CPU, no Triton)
SDPA with the same mask does the same.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

HAS_TRITON = importlib.util.find_spec("triton") is not None
BLOCK = 64  # keys a loop iteration holds


def span_mask(keys: int, key_start: torch.Tensor, end) -> torch.Tensor:
    """(B, 1, 1, keys): True for the keys in [key_start[b], end) of each row b (a cache's real keys, as a mask)."""
    index = torch.arange(keys, device=key_start.device)
    return ((index >= key_start[:, None]) & (index < end)).view(-1, 1, 1, keys)


def reference(q, k, v, key_start, end) -> torch.Tensor:
    """SDPA over the keys in [key_start[b], end) of each row b: what the kernel computes."""
    allowed = span_mask(k.shape[2], key_start, end)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


if HAS_TRITON:  # in a try: transformers' remote-code check (train.hf) takes what a try imports as optional
    try:
        import triton
        import triton.language as tl
    except ImportError:  # installed but unusable here: SDPA serves
        HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _decode(Q, K, V, Out, KS, END, sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, keys, group, scale,
                D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        b, h = tl.program_id(0), tl.program_id(1)
        kv = h // group  # the kv head this query head reads (grouped-query attention)
        d = tl.arange(0, D)
        # fp32 by cast: a compiled graph passes `scale` as a 64-bit float, which would make the loop's carry fp64
        q = (tl.load(Q + b * sq_b + h * sq_h + d).to(tl.float32) * scale).to(tl.float32)
        start, end = tl.load(KS + b), tl.load(END)
        m = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for t0 in range(0, keys, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            real = (t >= start) & (t < end)
            kb = tl.load(K + b * sk_b + kv * sk_h + t[:, None] * sk_t + d[None, :], mask=real[:, None], other=0.0)
            s = tl.where(real, tl.sum(kb.to(tl.float32) * q[None, :], 1), float("-inf"))
            new = tl.maximum(m, tl.max(s, 0))
            safe = tl.where(new == float("-inf"), 0.0, new)  # a block before any real key: nothing to rescale
            p = tl.where(real, tl.exp(s - safe), 0.0)
            alpha = tl.exp(m - safe)
            vb = tl.load(V + b * sv_b + kv * sv_h + t[:, None] * sv_t + d[None, :], mask=real[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vb.to(tl.float32), 0)
            total = total * alpha + tl.sum(p, 0)
            m = new
        tl.store(Out + b * so_b + h * so_h + d, (acc / total).to(Out.dtype.element_ty))

    @torch.library.triton_op("fusion::decode_attention", mutates_args=())
    def _decode_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor, end: torch.Tensor
    ) -> torch.Tensor:
        B, H, _, D = q.shape
        out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
        torch.library.wrap_triton(_decode)[(B, H)](
            q, k, v, out, key_start, end, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), k.shape[2], H // k.shape[1],
            D**-0.5, D=D, BLOCK=BLOCK,
        )  # fmt: skip
        return out


def decode_attention(q, k, v, key_start: torch.Tensor, end) -> torch.Tensor:
    """q (B, H, 1, D) against k, v (B, KV, keys, D), KV dividing H; each row b reads the keys in
    [key_start[b], end) (end: the same for every row, an int or a 0-d tensor). Returns (B, H, 1, D) in q's dtype."""
    if not isinstance(end, torch.Tensor):  # a growing cache's end is the number of keys it holds
        end = torch.tensor(end, device=q.device)
    usable = HAS_TRITON and q.is_cuda and q.shape[2] == 1 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    if usable and q.shape[-1] in (16, 32, 64, 128, 256):
        return _decode_op(q, k, v, key_start, end)
    return reference(q, k, v, key_start, end)
