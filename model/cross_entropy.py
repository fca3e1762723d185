"""The output layer's cross-entropy and z-loss with the logits' gradient made in the forward pass, in place.

Why: the loss ends the graph, so its gradient with respect to the logits is known as soon as each row's
log-sum-exp is: (softmax - one-hot) / n for the cross-entropy, plus 2 * z * lse * softmax / n for the z-loss. On a
GPU one Triton program per row reads the row's logits, takes the log-sum-exp online, and overwrites the row with
that gradient (elsewhere torch's ops do the same); the backward is then the head's two matmuls. Autograd instead
reads the B x T x V logits for the log-sum-exp, then again in the backward, and writes a gradient buffer as large.
The hidden states' gradient (G @ W) is made in the forward too, so the backward needs no weight. Used by
`FusionTransformer.text_losses` whenever a gradient is wanted; tests check it against autograd.
"""

from __future__ import annotations

import importlib.util

import torch

IGNORE = -100
HAS_TRITON = importlib.util.find_spec("triton") is not None
ENABLED = True  # benchmarks/gpu_step.py's `torchloss` turns it off to compare
# A Triton program's launch: vocabulary entries it holds at once, and its warps. On an H100, 16384 x 16 moves a
# 131072 x 32768 logits buffer at 2.85 TB/s, 8192 x 8 at 2.13, an in-place multiply at 3.01; a whole row of 32768
# held in registers was slower (benchmarks/cross_entropy.py; docs/PERFORMANCE.md, round 8).
MAX_BLOCK = 16384
NUM_WARPS = 16


@torch.compiler.disable  # asked at every call: a compiled region does not guard on a sharded weight's size
def usable(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """When a gradient is wanted and the weight is materialised here (a sharded engine such as ZeRO-3 gathers it
    only inside the layer's own forward, which this path does not call)."""
    wanted = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return ENABLED and wanted and weight.dim() == 2 and weight.numel() > 0


def _rows_torch(logits, targets, n, z_weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's work in torch's ops (off GPUs): each row's loss terms, and its gradient written over it."""
    x, valid, picked_at = logits.float(), targets != IGNORE, targets.clamp(min=0).unsqueeze(-1)
    lse = torch.logsumexp(x, -1, keepdim=True)
    loss = torch.where(valid, (lse - x.gather(-1, picked_at)).squeeze(-1), 0.0)  # before x (maybe logits) changes
    grad = torch.exp(x - lse) * (1 + 2 * z_weight * lse)
    grad.scatter_add_(-1, picked_at, -torch.ones_like(lse))
    logits.copy_(grad * (valid / n).unsqueeze(-1))
    return loss, torch.where(valid, lse.squeeze(-1).square(), 0.0)


if HAS_TRITON:  # in a try: transformers' remote-code check (train.hf) takes what a try imports as optional
    try:
        import triton
        import triton.language as tl
    except ImportError:  # installed but unusable here: the torch path serves
        HAS_TRITON = False

if HAS_TRITON:
    _IGNORE = tl.constexpr(IGNORE)  # a Triton kernel reads only constexpr globals

    @triton.jit
    def _rows(logits, stride, targets, n_valid, loss, lse_sq, z_weight, V: tl.constexpr, BLOCK: tl.constexpr):
        """Per row: log-sum-exp online over the vocabulary, the row's loss terms, then its gradient in place."""
        row = tl.program_id(0).to(tl.int64)
        ptr = logits + row * stride
        target = tl.load(targets + row)
        valid = target != _IGNORE
        m = tl.full([], -float("inf"), tl.float32)
        d = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(d)
        picked = tl.load(ptr + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(loss + row, tl.where(valid, lse - picked, 0.0))
        tl.store(lse_sq + row, tl.where(valid, lse * lse, 0.0))
        scale = tl.where(valid, 1.0 / tl.load(n_valid).to(tl.float32), 0.0)
        factor = 1.0 + 2.0 * z_weight * lse
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * factor
            g = tl.where(cols == target, g - 1.0, g) * scale
            tl.store(ptr + cols, g.to(logits.dtype.element_ty), mask=cols < V)


def _rows_triton(logits, targets, n, z_weight) -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.empty(len(targets), device=logits.device, dtype=torch.float32)
    lse_sq = torch.empty_like(loss)
    if len(targets):
        block = min(MAX_BLOCK, triton.next_power_of_2(logits.shape[1]))
        _rows[(len(targets),)](logits, logits.stride(0), targets, n, loss, lse_sq, z_weight, V=logits.shape[1],
                               BLOCK=block, num_warps=NUM_WARPS)  # fmt: skip
    return loss, lse_sq


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, z_weight):
        logits = h @ weight.t()  # (K, V), h's dtype: bf16 on GPUs
        n = (targets != IGNORE).sum().clamp(min=1)
        rows = _rows_triton if HAS_TRITON and logits.is_cuda else _rows_torch
        loss, lse_sq = rows(logits, targets, n, z_weight)
        grad_h = logits @ weight  # the logits now hold their gradient
        ctx.save_for_backward(h, logits, grad_h)
        ctx.weight_dtype = weight.dtype
        text, z = loss.sum() / n, z_weight * lse_sq.sum() / n
        ctx.mark_non_differentiable(text, z)
        return text + z, text, z

    @staticmethod
    def backward(ctx, g, _g_text, _g_z):
        h, grad_logits, grad_h = ctx.saved_tensors
        grad_w = grad_logits.t() @ h.to(grad_logits.dtype)  # under autocast h may be fp32, the logits bf16
        return (grad_h * g).to(h.dtype), (grad_w * g).to(ctx.weight_dtype), None, None


@torch.compiler.disable  # a Triton kernel of its own: compiled regions call it as it is
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_weight: float):
    """h (..., d), weight (V, d), targets (...) -> (cross-entropy + z-loss, cross-entropy, z-loss), means over the
    targets that are not IGNORE. Only the first carries a gradient: the model's loss is their sum."""
    return _LinearCrossEntropy.apply(h.flatten(0, -2), weight, targets.flatten().contiguous(), float(z_weight))
