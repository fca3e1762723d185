"""Grouped-query self-attention over packed multimodal rows, with interchangeable kernels.

One rule, three kernels. Query i may attend key j when both lie in the same document and either j <= i (causal)
or, with the bidirectional image mask, both are patches of the same image. Documents and images are contiguous
runs of a row (packing makes them so; the model's input check refuses anything else), so the rule is an interval
per query: j from the first position of i's document to i, or to the last patch of i's image. Kernels:
  - flex:  `flex_attention` with a block mask built once per batch (sparse: skips cross-document blocks);
  - sdpa:  `scaled_dot_product_attention` with an explicit (B, 1, T, T) boolean mask, the portable fallback;
  - flash: flash-attn's varlen kernel over document segments (causal only: it cannot express image blocks).
Tests check that all kernels compute the same function.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model.config import ConfigError, ModelConfig
from model.decode_attention import decode_attention
from model.rope import apply_rotary

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
if HAS_FLASH_ATTN:  # in a try: transformers' remote-code check (train.hf) takes what a try imports as optional
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # installed but unusable here: the backend check says so when it is asked for
        HAS_FLASH_ATTN = False
# flex tiles: the block mask's granularity, and the kernels' tiles per head dim. With heads of 64, 64 x 64 forward
# tiles waste less work on the partial blocks of short packed documents than torch's defaults (+8% tokens/s for a
# 125M step on an H100); with heads of 128 torch's defaults are best (benchmarks/attention.py; PERFORMANCE.md). With
# heads of 16 (the study's family) a granularity of 64, which needs tiles of at most 64 in both passes: +10% for a
# depth-8 study cell's captured step on an H200, whose documents of 40-130 positions leave most 128-blocks partial
# (docs/study/STUDY.md); other tiles at 128 were slower.
FLEX_BLOCK_SIZE = 128
FLEX_BLOCK_SIZE_BY_HEAD: dict[int, int] = {16: 64}  # head dims not listed: FLEX_BLOCK_SIZE
_TILES_64 = {f"BLOCK_{k}": 64 for k in ("M", "N", "M1", "N1", "M2", "N2")}
FLEX_KERNEL_OPTIONS: dict[int, dict | None] = {64: {"BLOCK_M": 64, "BLOCK_N": 64}, 16: _TILES_64}  # others: torch's


def flex_block_size(head_dim: int | None) -> int:
    """The block mask's granularity for heads of `head_dim` (None: the default)."""
    return FLEX_BLOCK_SIZE_BY_HEAD.get(head_dim, FLEX_BLOCK_SIZE)


def resolve_backend(cfg: ModelConfig, device: torch.device) -> str:
    """The kernel `auto` means on this device, and a clear error for a kernel that cannot run the config."""
    backend = cfg.attention_backend
    if backend == "flash":
        if not HAS_FLASH_ATTN:
            raise ConfigError("attention_backend='flash' but flash_attn is not importable (pip install '.[flash]')")
        if cfg.image_mask != "causal":
            raise ConfigError("attention_backend='flash' supports image_mask='causal' only (no image blocks in varlen)")
    flex_ok = device.type != "cuda" or cfg.head_dim >= 16  # compiled flex kernels need head_dim >= 16
    if backend == "flex" and not flex_ok:
        raise ConfigError(f"attention_backend='flex' needs head_dim >= 16 on CUDA; head_dim={cfg.head_dim}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "sdpa"  # flex runs eagerly (slowly) off-GPU; the dense mask is cheap at CPU sizes
    if HAS_FLASH_ATTN and cfg.image_mask == "causal":
        return "flash"
    return "flex" if flex_ok else "sdpa"


def attention_spans(
    doc: torch.Tensor, img: torch.Tensor, bidirectional: bool | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (B, T): query t attends keys lo[t]..hi[t]. lo is the first position of t's document, hi is t
    itself or, with bidirectional images, the last position of t's image. Fixed-shape ops only (no host wait).
    `bidirectional` may be a 0-dim bool tensor: then it is data, not code, and a compiled graph serves both masks
    (the model passes its own, so a sweep's two image masks share one compile)."""
    B, T = doc.shape
    t = torch.arange(T, device=doc.device).expand(B, T)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    lo = torch.where(starts, t, 0).cummax(1).values
    if bidirectional is False:
        return lo, t
    inside = img >= 0
    last = inside.clone()
    last[:, :-1] &= img[:, :-1] != img[:, 1:]
    image_end = torch.where(last, t, T).flip(1).cummin(1).values.flip(1)  # the next image end at or after t
    return lo, torch.where(inside & bidirectional, image_end, t)


def mask_rule(lo: torch.Tensor, hi: torch.Tensor):
    """The rule, written once (as flex's mask_mod): query q of row b may attend key k. Two loads indexed by the
    query only; comparing document and image ids of query and key instead made flex 13% slower on mixed rows
    (`benchmarks/attention.py --pairwise`)."""

    def allowed(b, h, q, k):
        return (k >= lo[b, q]) & (k <= hi[b, q])

    return allowed


@dataclass
class AttentionMask:
    """Everything a kernel needs to apply the mask rule to one batch; built once, shared by all layers."""

    backend: str
    lo: torch.Tensor  # (B, T): `attention_spans`
    hi: torch.Tensor
    dense: torch.Tensor | None = None  # sdpa: (B, 1, T, T) bool
    block: object | None = None  # flex: BlockMask
    cu_seqlens: torch.Tensor | None = None  # flash: document boundaries over the flattened batch
    max_seqlen: int = 0

    @classmethod
    def build(
        cls, backend: str, doc_ids, image_ids, bidirectional_images: bool | torch.Tensor, head_dim: int | None = None
    ) -> AttentionMask:
        """head_dim: the heads' (flex picks its block granularity by it, `flex_block_size`)."""
        mask = cls(backend, *attention_spans(doc_ids, image_ids, bidirectional_images))
        if backend == "sdpa":
            mask.dense_mask()
        elif backend == "flex":
            flags = _compiled(_tile_flags) if doc_ids.is_cuda else _tile_flags
            size = flex_block_size(head_dim)
            tiles = flags(mask.lo, mask.hi, size)
            mask.block = _block_mask(mask.rule(), *tiles, doc_ids.shape[1], size)
        elif backend == "flash":
            flat = doc_ids.reshape(-1)
            T = doc_ids.shape[1]
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = flat[1:] != flat[:-1]
            starts[::T] = True  # a new row always starts a new segment
            idx = torch.nonzero(starts).squeeze(-1)
            cu = torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)
            mask.cu_seqlens = cu
            mask.max_seqlen = int((cu[1:] - cu[:-1]).max())
        else:
            raise ConfigError(f"unknown attention backend '{backend}'")
        return mask

    def rule(self):
        """The mask rule as a flex mask_mod; `dense_mask` evaluates it on the full grid."""
        return mask_rule(self.lo, self.hi)

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, built once per batch (SDPA uses it; the logit telemetry of every layer reuses it)."""
        if self.dense is None:
            self.dense = _allowed_grid(self.lo, self.hi).unsqueeze(1)
        return self.dense


def _allowed_grid(lo, hi) -> torch.Tensor:
    """(B, T, T) bool: the rule on every (query, key) pair."""
    B, T = lo.shape
    pos = torch.arange(T, device=lo.device)
    b = torch.arange(B, device=lo.device)[:, None, None]
    return mask_rule(lo, hi)(b, 0, pos[None, :, None], pos[None, None, :])


@functools.cache
def _compiled(fn):
    """`fn` compiled once, for CUDA tensors: flex attention is only fast compiled, and the tile flags become one
    fused pass instead of a dozen eager ones."""
    return torch.compile(fn, dynamic=False)


def _tile_flags(lo, hi, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, n, n) bools over tiles of size x size: the tile has some allowed pair; it has only allowed pairs.
    From the intervals directly, per (query, key tile), without the T x T grid. T is padded up to whole tiles;
    padded positions attend nothing and are attended by nothing."""
    B, T = lo.shape
    n = -(-T // size)
    first = torch.arange(n, device=lo.device) * size  # each key tile's first key
    last = first + size - 1  # and its last, which is padding when past T
    lo = F.pad(lo, (0, n * size - T), value=T).view(B, n, size, 1)  # a padded query's interval is empty
    hi = F.pad(hi, (0, n * size - T), value=-1).view(B, n, size, 1)
    some = ((lo <= last.clamp(max=T - 1)) & (hi >= first)).any(2)
    every = ((lo <= first) & (hi >= last)).all(2) & (last < T)
    return some.unsqueeze(1), every.unsqueeze(1)


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flex's sparse row format without a sort: per row, the count of selected tiles and their column indices in
    ascending order, followed by the unselected ones (which the kernels never read)."""
    counts = tiles.sum(-1, dtype=torch.int32)
    selected_rank = tiles.cumsum(-1) - 1
    other_rank = counts.unsqueeze(-1) + (~tiles).cumsum(-1) - 1
    position = torch.where(tiles, selected_rank, other_rank)
    columns = torch.arange(tiles.shape[-1], device=tiles.device, dtype=torch.int32).expand_as(position)
    return counts, torch.empty_like(columns).scatter_(-1, position, columns)


def _block_mask(rule, any_allowed: torch.Tensor, all_allowed: torch.Tensor, T: int, size: int):
    """A flex BlockMask from tile flags, built from fixed-shape tensor ops only, so it never waits for the GPU;
    torch's `create_block_mask` (which orders tiles with an argsort) waited once per batch (gpu_step.py --syncs)."""
    from torch.nn.attention.flex_attention import BlockMask

    partial = any_allowed & ~all_allowed
    kv_num, kv_idx = _ordered(partial)
    full_kv_num, full_kv_idx = _ordered(all_allowed)
    q_num, q_idx = _ordered(partial.transpose(-2, -1))
    full_q_num, full_q_idx = _ordered(all_allowed.transpose(-2, -1))
    return BlockMask(
        seq_lengths=(T, T),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(size, size),
        mask_mod=rule,
    )


def _flex(q, k, v, block, gqa: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block, enable_gqa=gqa)
    options = FLEX_KERNEL_OPTIONS.get(q.shape[-1])
    return _compiled(flex_attention)(q, k, v, block_mask=block, enable_gqa=gqa, kernel_options=options)


def attend(q, k, v, mask: AttentionMask | None) -> torch.Tensor:
    """q: (B, H, Tq, D), k/v: (B, KV, Tk, D) -> (B, H, Tq, D). mask None: attend to every key (cached decode)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
    if mask.backend == "flex":
        return _flex(q, k, v, mask.block, gqa)

    B, H, T, D = q.shape
    half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    qf, kf, vf = (rearrange(t, "b h t d -> (b t) h d").to(half) for t in (q, k, v))
    out = flash_attn_varlen_func(
        qf, kf, vf, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen, causal=True
    )
    return rearrange(out, "(b t) h d -> b h t d", b=B).to(q.dtype)


# A cached step's attention kernel (benchmarks/decode.py's engines compare them on a GPU): "sdpa" (SDPA with a mask),
# "flex" (flex_attention's decoding kernel, compiled CUDA steps only), "math" (two matmuls and a softmax, which
# inductor is free to fuse), "triton" (model.decode_attention: one program a row and head, reading only the row's
# real keys; one-query steps of a cache that gives its keys as a span, `key_span`, on a GPU with Triton; elsewhere
# SDPA over the same span). "triton" is the default: at batch 256 it beat SDPA in every H200 call that ran both; at
# batch 64 it won one call, lost one and tied one (docs/PERFORMANCE.md).
CACHED_KERNEL = "triton"


def attend_cached(q, k, v, cache, new: int) -> torch.Tensor:
    """A cached step's attention: q (B, H, new, D) to the cache's keys, of which `cache.key_mask` (B, 1, 1, Tk) says
    which are real. SDPA with the mask takes cuDNN's kernel on an H200, whose 16-query tiles serve one query a row:
    42% of a 20M decode step's kernel time. flex_attention's decoding kernel (splitting the keys across the GPU) and
    the plain matmuls were no faster at 20M or 125M; `model.decode_attention`'s kernel was (docs/PERFORMANCE.md)."""
    if CACHED_KERNEL == "triton" and new == 1 and hasattr(cache, "key_span"):
        return decode_attention(q, k, v, *cache.key_span(new))
    allowed = cache.key_mask(k.shape[2], new)
    gqa = q.shape[1] != k.shape[1]
    if CACHED_KERNEL == "math":
        B, H, T, D = q.shape
        KV = k.shape[1]
        grouped = q.reshape(B, KV, (H // KV) * T, D)  # head h reads kv head h // (H // KV), as enable_gqa does
        scores = (grouped @ k.transpose(-1, -2)).float() * D**-0.5
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
        return (weights @ v).reshape(B, H, T, D)
    if not (CACHED_KERNEL == "flex" and torch.compiler.is_compiling() and q.is_cuda):  # CPU flex: no kernel
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    keep = allowed.view(allowed.shape[0], allowed.shape[-1])

    def real_keys(score, b, h, q_idx, kv_idx):
        return torch.where(keep[b, kv_idx], score, -float("inf"))

    return flex_attention(q, k, v, score_mod=real_keys, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        norm = (lambda: nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.track_max_logit = False  # telemetry: set by the trainer on logging steps only (costs a T x T matmul)
        self.max_logit: torch.Tensor | None = None

    def forward(self, x, cos, sin, mask: AttentionMask | None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).view(B, T, -1, self.head_dim).split([self.n_heads, self.n_kv_heads, self.n_kv_heads], 2)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        # (B, H, T, D) views of (B, T, H, D) memory: the kernels take strides, so no transposing copy is made here,
        # and the output comes back in the layout `wo` reads.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.track_max_logit and mask is not None:
            self.max_logit = self._max_logit(q, k, mask)
        if mask is None and cache is not None:  # a cached step: the cache says which of its keys are real
            out = attend_cached(q, k, v, cache, T)
        else:
            out = attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def _max_logit(self, q, k, mask: AttentionMask) -> torch.Tensor:
        """Largest attention logit over allowed pairs: Chameleon's early warning for divergence."""
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5
        return scores.masked_fill(~mask.dense_mask(), float("-inf")).amax()
