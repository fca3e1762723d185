"""Tried in round 5, not taken (docs/PERFORMANCE.md): the output layer's cross-entropy and z-loss with the logits'
gradient made in the forward pass (`gpu_step.py` variant word `gradloss`).

The loss ends the graph, so its gradient with respect to the logits is known as soon as the log-sum-exp is:
(softmax - one-hot) / n for the cross-entropy and 2 * z * lse * softmax / n for the z-loss. Made there, it comes out
of the kernel that reads the logits for the log-sum-exp, where autograd reads the B x T x V logits once more in the
backward; the backward is then only the output layer's two matmuls, scaled by the incoming gradient.
"""

from __future__ import annotations

import torch

from model import IGNORE, FusionTransformer
from model.transformer import at_targets, pick_targets


def _losses(logits: torch.Tensor, targets: torch.Tensor, z_weight: float, with_grad: bool):
    """(cross-entropy, z-loss, d(sum of both)/d logits or None) over the positions whose target is not IGNORE."""
    valid = targets != IGNORE
    n = valid.sum().clamp(min=1)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit, hit = pick_targets(logits, targets)  # compiled, the one-hot stays inside the fused kernel
    text = ((lse - target_logit) * valid).sum() / n
    z = z_weight * (lse.square() * valid).sum() / n
    if not with_grad:
        return text, z, None
    scale = (valid / n).unsqueeze(-1)
    grad = torch.exp(logits - lse.unsqueeze(-1)) * (1 + 2 * z_weight * lse.unsqueeze(-1))
    if hit is not None:
        grad = grad - hit.to(grad.dtype)
    else:
        grad = grad.scatter_add(-1, targets.clamp(min=0).unsqueeze(-1), -torch.ones_like(target_logit).unsqueeze(-1))
    return text, z, grad * scale


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, z_weight):
        logits = h @ weight.t()  # bf16 on GPUs (bf16 weights, or autocast)
        text, z, grad = _losses(logits.float(), targets, z_weight, with_grad=True)
        ctx.save_for_backward(h, weight, grad.to(logits.dtype))
        ctx.mark_non_differentiable(text, z)
        return text + z, text, z

    @staticmethod
    def backward(ctx, g, _g_text, _g_z):
        h, weight, grad = ctx.saved_tensors
        low = grad.dtype
        grad_h = (grad @ weight.to(low)).float() * g
        grad_w = (grad.flatten(0, -2).t() @ h.flatten(0, -2).to(low)).float() * g
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (..., d), weight (V, d), targets (...) -> (cross-entropy + z-loss, cross-entropy, z-loss). Only the first
    carries a gradient: the model's loss is their sum, and the other two are for the logs."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, z_weight)
    text, z, _ = _losses((h @ weight.t()).float(), targets, z_weight, with_grad=False)
    return text + z, text, z


def text_losses(self: FusionTransformer, h: torch.Tensor, targets: torch.Tensor, target_index=None):
    """`FusionTransformer.text_losses` (cross-entropy, z-loss) for the benchmark: the gradient flows through the
    first; their sum, which the model's loss is, has the gradient of both."""
    h, targets = at_targets(h, targets, target_index)
    both, text, z = linear_cross_entropy(h, self.lm_head.weight, targets, self.cfg.z_loss)
    return both - z, z


MODEL_TEXT_LOSSES = FusionTransformer.text_losses


def install(on: bool) -> None:
    """Swap the model's loss for this one (on) or back (off); before the model is built and compiled."""
    FusionTransformer.text_losses = text_losses if on else MODEL_TEXT_LOSSES
