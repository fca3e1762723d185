"""Parameter and training-FLOP counts from the config alone, so sweeps can plan cells without building models.

Conventions (stated because scaling-law fits depend on them):
  - "embedding" parameters are the input side: the token table and the patch projection (which only patch
    positions pay, as only text positions pay the lookup). An untied output head is a matmul every position pays
    for, so it counts as non-embedding; a tied head is the token table itself.
  - Training FLOPs per token are 6 * N_matmul (forward + backward), N_matmul being the non-embedding parameters
    plus a tied head, plus optionally attention's 12 * n_layers * d_attn * T (PaLM's 6N + 12LHQT, the full
    T x T score matrix, not halved for causality). The patch projection's 6 * patch_dim * d_model per patch
    position is left out, like the lookup.
"""

from __future__ import annotations

from model.config import ModelConfig


def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d + (2 * hd if cfg.qk_norm else 0)
    mlp = 3 * d * cfg.ffn_hidden
    per_layer = attn + mlp + 2 * d
    table = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    patch_in = cfg.patch_dim * d + d
    patch_out = (d * cfg.patch_dim + cfg.patch_dim) if cfg.image_loss_weight > 0 else 0
    non_embedding = L * per_layer + d + head + patch_out
    return non_embedding + (table + patch_in if embeddings else 0)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that cost 2 FLOPs per token in the forward pass."""
    return param_count(cfg, embeddings=False) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)


def flops_per_token(
    cfg: ModelConfig, seq_len: int | None = None, attention: bool = True, head_share: float = 1.0
) -> int | float:
    """Training FLOPs per token: 6N, plus 12 * L * d_attn * T when `attention` (T defaults to max_seq_len).
    head_share < 1: the output head counted only at that share of positions, those it runs at (the ones with a
    text target, `data.packing.target_index`) rather than at every one, as 6N has it."""
    flops = 6 * matmul_params(cfg)
    if head_share != 1.0:  # (an int otherwise, as totals of FLOPs in logs and summaries stay)
        flops -= 6 * cfg.vocab_size * cfg.d_model * (1 - head_share)
    if attention:
        flops += 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (seq_len or cfg.max_seq_len)
    return flops
