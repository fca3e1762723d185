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
# two warps a program: in a 20M decode step at batch 256 on an H200 the engine's tokens/s were 20.22% of the HBM
# bound against 19.41% with Triton's defaults (4 warps, 3 stages) in one call, the kernel 0.143 ms a step
# (docs/PERFORMANCE.md); `benchmarks/decode_tiles.py` times the kernel alone over its settings
LAUNCH = {"num_warps": 2, "num_stages": 2}
SPAN = 0  # keys a program takes when a row's keys are split over several programs (0: one program a row and head)


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
    def _decode(Q, K, V, Out, Stat, KS, END, sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_c, keys,
                group, scale, D: tl.constexpr, BLOCK: tl.constexpr, SPAN: tl.constexpr):  # fmt: skip
        """Program (b, h, c): query head h of row b against keys [c * SPAN, (c + 1) * SPAN) (SPAN 0: all of them),
        those in [key_start[b], end) read. SPAN 0 stores the attention's output; otherwise the part's unnormalised
        state, its weighted values in Out (fp32) and its max and sum of weights in Stat (B, H, parts, 2), for
        `_decode_op` to combine. A block's keys and values are loaded before either is used."""
        b, h, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv = h // group  # the kv head this query head reads (grouped-query attention)
        d = tl.arange(0, D)
        # fp32 by cast: a compiled graph passes `scale` as a 64-bit float, which would make the loop's carry fp64
        q = (tl.load(Q + b * sq_b + h * sq_h + d).to(tl.float32) * scale).to(tl.float32)
        start, end = tl.load(KS + b), tl.load(END)
        lo, hi = 0, keys
        if SPAN:
            lo = c * SPAN
            hi = tl.minimum(lo + SPAN, keys)
        m = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for t0 in range(lo, hi, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            real = (t >= start) & (t < end) & (t < hi)  # hi: a part's last key when SPAN is not a multiple of BLOCK
            kb = tl.load(K + b * sk_b + kv * sk_h + t[:, None] * sk_t + d[None, :], mask=real[:, None], other=0.0)
            vb = tl.load(V + b * sv_b + kv * sv_h + t[:, None] * sv_t + d[None, :], mask=real[:, None], other=0.0)
            s = tl.where(real, tl.sum(kb.to(tl.float32) * q[None, :], 1), float("-inf"))
            new = tl.maximum(m, tl.max(s, 0))
            safe = tl.where(new == float("-inf"), 0.0, new)  # a block before any real key: nothing to rescale
            p = tl.where(real, tl.exp(s - safe), 0.0)
            alpha = tl.exp(m - safe)
            acc = acc * alpha + tl.sum(p[:, None] * vb.to(tl.float32), 0)
            total = total * alpha + tl.sum(p, 0)
            m = new
        if SPAN:
            tl.store(Out + b * so_b + h * so_h + c * so_c + d, acc)
            part = (b * tl.num_programs(1) + h) * tl.num_programs(2) + c
            tl.store(Stat + part * 2, m)
            tl.store(Stat + part * 2 + 1, total)
        else:
            tl.store(Out + b * so_b + h * so_h + d, (acc / total).to(Out.dtype.element_ty))

    @torch.library.triton_op("fusion::decode_attention", mutates_args=())
    def _decode_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_start: torch.Tensor, end: torch.Tensor
    ) -> torch.Tensor:
        B, H, _, D = q.shape
        keys = k.shape[2]
        span = SPAN if SPAN and keys > SPAN else 0  # 0: one program a row and head walks all the keys
        parts = -(-keys // span) if span else 1
        if span:  # several programs a row and head, `span` keys each, their states combined below
            out = torch.empty(B, H, parts, D, device=q.device, dtype=torch.float32)
            stat = torch.empty(B, H, parts, 2, device=q.device, dtype=torch.float32)
        else:
            out = stat = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)  # Stat: not written unsplit
        torch.library.wrap_triton(_decode)[(B, H, parts)](
            q, k, v, out, stat, key_start, end, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), keys, H // k.shape[1],
            D**-0.5, D=D, BLOCK=BLOCK, SPAN=span, **LAUNCH,
        )  # fmt: skip
        if not span:
            return out
        m, total = stat[..., 0], stat[..., 1]
        weight = torch.exp(m - m.amax(-1, keepdim=True))  # a part with no real key: max -inf, weight 0
        return ((out * weight[..., None]).sum(2) / (total * weight).sum(-1, keepdim=True)).unsqueeze(2).to(q.dtype)


def decode_attention(q, k, v, key_start: torch.Tensor, end) -> torch.Tensor:
    """q (B, H, 1, D) against k, v (B, KV, keys, D), KV dividing H; each row b reads the keys in
    [key_start[b], end) (end: the same for every row, an int or a 0-d tensor). Returns (B, H, 1, D) in q's dtype."""
    if not isinstance(end, torch.Tensor):  # a growing cache's end is the number of keys it holds
        end = torch.tensor(end, device=q.device)
    usable = HAS_TRITON and q.is_cuda and q.shape[2] == 1 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    if usable and q.shape[-1] in (16, 32, 64, 128, 256):
        return _decode_op(q, k, v, key_start, end)
    return reference(q, k, v, key_start, end)
