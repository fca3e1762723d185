"""Decoding from an image+text prompt with a KV cache: greedy, or temperature with top-p (nucleus) sampling.

The prompt is a one-row batch laid out like training data (so its image keeps the bidirectional block mask in
the prefill). Each new text token takes the next 1-D position after the prompt's largest id, as M-RoPE
prescribes for text that follows an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.transformer import FusionTransformer


class KVCache:
    """Per-layer keys and values (post-rotary) preallocated for `max_len` positions."""

    def __init__(self, model: FusionTransformer, batch: int, max_len: int, device, dtype):
        cfg = model.cfg
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0  # positions already written, advanced by the model after all layers ran

    @property
    def decoding(self) -> bool:
        """Whether the next forward is a cached step (new tokens attend to the cache, no mask built)."""
        return self.length > 0

    def advance(self, n: int) -> None:
        self.length += n

    def key_mask(self, keys: int, new: int) -> torch.Tensor | None:
        """Which cached keys a cached step may read, (B, 1, 1, keys) or None for all of them."""
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache holds {self.k[layer].shape[2]} positions; {end} were needed")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def append_text(batch: dict, token_ids: list[int]) -> dict:
    """The batch with text tokens appended to its (single) document, positions continuing after the max."""
    tokens = batch["tokens"]
    B, T = tokens.shape
    n = len(token_ids)
    dev = tokens.device
    positions = batch.get("positions")
    if positions is None:
        positions = torch.arange(T, device=dev).expand(B, T)
    start = int(positions.max()) + 1
    new_pos = torch.arange(start, start + n, device=dev).expand(B, n)
    if positions.dim() == 3:
        new_pos = new_pos.unsqueeze(-1).expand(B, n, 3)
    out = dict(batch)
    out["tokens"] = torch.cat([tokens, torch.tensor(token_ids, dtype=tokens.dtype, device=dev).expand(B, n)], dim=1)
    out["positions"] = torch.cat([positions, new_pos], dim=1)
    for key, fill in (("patch_mask", False), ("image_ids", -1)):
        if batch.get(key) is not None:
            out[key] = torch.cat([batch[key], torch.full((B, n), fill, dtype=batch[key].dtype, device=dev)], 1)
    if batch.get("doc_ids") is not None:
        out["doc_ids"] = torch.cat([batch["doc_ids"], batch["doc_ids"][:, -1:].expand(B, n)], dim=1)
    out.pop("targets", None)
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits (B, V) -> ids (B,). temperature 0 is greedy; top_p keeps the smallest set with that much mass."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before this token already reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    tokens: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)  # per step (V,), kept when asked for


@torch.no_grad()
def generate(
    model: FusionTransformer,
    prompt: dict,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Continue a one-row prompt batch. Prefill once over the prompt, then one cached step per token."""
    tokens = prompt["tokens"]
    if tokens.shape[0] != 1:
        raise ValueError(f"generate takes a one-row prompt; got {tokens.shape[0]} rows")
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    cache = KVCache(model, 1, tokens.shape[1] + max_new_tokens, param.device, param.dtype)
    prompt = {k: v for k, v in prompt.items() if k != "targets"}
    logits = model(**prompt, cache=cache, return_logits=True, last_logits=True).logits[:, -1]
    positions = prompt.get("positions")
    next_pos = (int(positions.max()) if positions is not None else tokens.shape[1] - 1) + 1
    result = Generation(tokens=[])
    for step in range(max_new_tokens):
        if keep_logits:
            result.logits.append(logits[0].clone())
        token = sample(logits, temperature, top_p, generator)
        result.tokens.append(int(token))
        if token.item() == eos_id or step == max_new_tokens - 1:
            break
        pos = torch.full((1, 1, 3), next_pos + step, dtype=torch.long, device=param.device)
        logits = model(token.view(1, 1), positions=pos, cache=cache, return_logits=True).logits[:, -1]
    model.train(was_training)
    return result
