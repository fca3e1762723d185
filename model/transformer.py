"""The early-fusion decoder: text tokens and linearly embedded image patches in one residual stream.

A batch is a dict of tensors laid out by the data layer (see README, "Batch format"):
  tokens     (B, T) long   token ids; at patch positions any valid id (ignored)
  patches    (P, C*p*p)    uint8 pixel patches (mapped to [-1, 1] here), or floats already normalised, in the order
                           their positions appear in the batch; or padded to one row per position (P = B*T), the
                           patches first and the rest ignored: a batch of fixed shape (train.graphed_step)
  patch_mask (B, T) bool   True where a patch embedding replaces the token embedding
  positions  (B, T, 3)     (t, h, w) rotary ids, restarting per document; (B, T) for 1-D RoPE
  doc_ids    (B, T)        document of each position, one contiguous run each; attention never crosses documents
  image_ids  (B, T)        image of each position (unique within a row, contiguous, inside one document), -1 outside
  targets    (B, T) long   next-token targets, -100 where there is none (image positions never are targets)
  target_index (K,) long   optional: the flat positions (row * T + t) that have a target, ascending, padded with -1
                           (data.packing.target_index); with it the output head runs at those positions only
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model import cross_entropy
from model.attention import Attention, AttentionMask, resolve_backend
from model.config import ModelConfig
from model.cross_entropy import IGNORE
from model.mlp import MLP
from model.rope import Rotary


def unit_pixels(patches: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], on the device: the loader hands over a quarter of the bytes floats take.
    Float patches are taken as already normalised (synthetic inputs, tests)."""
    return patches.float() * (2.0 / 255.0) - 1.0 if patches.dtype == torch.uint8 else patches


def _scattered_runs(ids: torch.Tensor) -> torch.Tensor:
    """How many more runs than distinct ids (>= 0) the rows of a (B, T) id tensor have: nonzero when an id comes
    back after another; attention reads documents and images as contiguous spans (model.attention)."""
    valid = ids >= 0
    run_starts = valid.clone()
    run_starts[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    ordered = ids.sort(1).values
    distinct = ordered >= 0
    distinct[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    return run_starts.sum() - distinct.sum()


class InputError(ValueError):
    """A batch that does not fit the model's configuration; the message names the value and the limit."""


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None  # text + image_loss_weight * image + z
    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logit_norm: torch.Tensor | None = None  # mean L2 norm of output logits, while telemetry is on


def _patch_index(patch_mask: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Flat positions of the patches. The count comes from the patch tensor's shape, so this never waits for the
    GPU, where `x[patch_mask]` or `masked_scatter`'s backward would (a data-dependent size, read back to the host
    once per use): +16% tokens/s for a mixed 125M step on an H100 (docs/PERFORMANCE.md). Patches padded to one a
    position get B*T, one past the last position, for their padding rows."""
    flat = patch_mask.flatten()
    return torch.nonzero_static(flat, size=n_patches, fill_value=flat.numel()).squeeze(-1)


def pick_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each position's target logit.

    Compiled, the target is picked by comparison with the vocabulary index instead of `gather`: the backward is
    then one element-wise kernel (softmax minus one-hot) instead of a scatter into a zeroed B x T x V fp32 tensor
    plus a second pass, and the forward shares the log-sum-exp's read of the logits: -2.6 ms of GPU time per 125M
    step on an H100 (docs/PERFORMANCE.md). Eagerly the one-hot would be materialised, hence `gather` there."""
    if torch.compiler.is_compiling():
        hit = torch.arange(logits.shape[-1], device=logits.device) == targets.unsqueeze(-1)
        return torch.where(hit, logits, 0.0).sum(-1)
    return logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def at_targets(h: torch.Tensor, targets: torch.Tensor, target_index: torch.Tensor | None):
    """The hidden states and targets of the positions that have a target, so that the output head and the loss over
    the vocabulary skip the rest: in a packed image-caption row most positions can be patches, which no text loss
    reads. Padding entries (-1) pick position 0 with no target. Without an index: all positions, flattened."""
    h, targets = h.flatten(0, -2), targets.flatten()
    if target_index is None:
        return h, targets
    picked = target_index.clamp(min=0)
    return h.index_select(0, picked), targets.index_select(0, picked).masked_fill(target_index < 0, IGNORE)


def _zero_touch(linear: nn.Linear) -> torch.Tensor:
    """A zero that depends on every parameter of a layer the batch did not use: its gradients are zeros, not
    None, so data-parallel ranks reduce the same gradients whether or not their batch held an image. It runs
    the layer's forward (on one zero row) so that ZeRO-3 gathers the partitioned weights as usual."""
    return linear(linear.weight.new_zeros(1, linear.in_features)).sum() * 0.0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.post_norm = cfg.norm_order == "post"
        self.attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden)
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, cache=None):
        if self.post_norm:  # Chameleon: normalise each sublayer's output before it joins the residual
            x = x + self.drop(self.norm1(self.attn(x, cos, sin, mask, cache)))
            return x + self.drop(self.norm2(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class FusionTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.patch_emb = nn.Linear(cfg.patch_dim, cfg.d_model)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_sections, cfg.rope_theta, cfg.mrope_interleaved)
        # the image mask as data, not a branch: a compiled forward is the same graph for both masks, so a sweep's two
        # recipes share one compile (scaling.local.compile_shape); not saved (the config says it)
        bidirectional = torch.tensor(cfg.image_mask == "bidirectional")
        self.register_buffer("bidirectional_images", bidirectional, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.patch_head = nn.Linear(cfg.d_model, cfg.patch_dim) if cfg.image_loss_weight > 0 else None
        self.check_inputs = True  # one host sync per forward; the trainer may turn it off after the first batches
        self.telemetry = False  # see track_attention_logits
        # The loss through model.cross_entropy's kernel where it runs. Off where the whole forward is one compiled
        # graph (train.engine.apply_compile, scope model): the kernel's call is a graph break there.
        self.loss_kernel = True
        self.reset_parameters()

    def reset_parameters(self):
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2 * n_layers) (GPT-2)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Linear):
                residual_out = name.endswith(("attn.wo", "mlp.w_down"))
                nn.init.normal_(module.weight, std=std / math.sqrt(2 * self.cfg.n_layers) if residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def attention_backend(self, device: torch.device) -> str:
        return resolve_backend(self.cfg, device)

    # ----------------------------------------------------------------------------------------------- inputs
    def _check(self, tokens, patches, patch_mask, doc_ids, image_ids, targets=None, target_index=None):
        cfg = self.cfg
        B, T = tokens.shape
        if cfg.max_seq_len < T:
            raise InputError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        if patches is not None and patches.shape[0] and patches.shape[-1] != cfg.patch_dim:
            raise InputError(
                f"patch tensor has {patches.shape[-1]} values per patch; the config expects "
                f"channels * patch_size**2 = {cfg.channels} * {cfg.patch_size}**2 = {cfg.patch_dim}"
            )
        zero = tokens.new_zeros(())
        most = straddling = zero  # most patches in one image; image positions continuing into another document
        if patch_mask is not None and image_ids is not None:
            key = (torch.arange(B, device=tokens.device)[:, None] * (T + 1) + image_ids + 1)[patch_mask]
            most = torch.bincount(key).max() if key.numel() else zero
        if doc_ids is not None and image_ids is not None:
            same_image = (image_ids[:, 1:] == image_ids[:, :-1]) & (image_ids[:, 1:] >= 0)
            straddling = (same_image & (doc_ids[:, 1:] != doc_ids[:, :-1])).sum()
        unlisted = zero  # target_index that is not exactly the positions with a target, then -1s
        if targets is not None and target_index is not None:
            expected = torch.nonzero((targets != IGNORE).flatten()).squeeze(-1)  # a host wait, as this check makes
            n = len(expected)
            ok = len(target_index) >= n and torch.equal(target_index[:n], expected) and (target_index[n:] == -1).all()
            unlisted = zero + (not ok)
        stats = [
            tokens.min(),
            tokens.max(),
            patch_mask.sum() if patch_mask is not None else zero,
            most,
            _scattered_runs(doc_ids) if doc_ids is not None else zero,
            _scattered_runs(image_ids) if image_ids is not None else zero,
            straddling,
            unlisted,
        ]
        lo, hi, n_patch_pos, most, split_docs, split_images, straddling, unlisted = torch.stack(
            [s.long() for s in stats]
        ).tolist()
        if split_docs or split_images or straddling:
            what = "a document" if split_docs else "an image" if split_images else "an image crossing documents"
            raise InputError(
                f"{what} is not one contiguous run of its row: doc_ids and image_ids must mark contiguous spans "
                "(as data.packing lays them out), and an image must lie inside one document"
            )
        if unlisted:
            raise InputError(
                "target_index does not list exactly the positions whose target is not -100, ascending and padded "
                "with -1 (data.packing.target_index makes it)"
            )
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        n_patches = 0 if patches is None else patches.shape[0]
        if n_patch_pos != n_patches and not (n_patches == B * T and n_patch_pos < n_patches):  # or padded
            raise InputError(
                f"patch_mask marks {n_patch_pos} positions but {n_patches} patches were given (give one patch per "
                f"marked position, or pad them to one per position: {B * T})"
            )
        if most > cfg.max_image_patches:
            raise InputError(f"an image has {most} patches, more than max_image_patches={cfg.max_image_patches}")

    def embed(self, tokens, patches, patch_index):
        """patch_index: the patches' flat positions (`_patch_index`), None where the batch has no patches."""
        x = self.tok_emb(tokens)
        if patch_index is None:
            return x + _zero_touch(self.patch_emb)
        # .to(x.dtype): under autocast the projection comes out in bf16 while the table lookup stays fp32
        projected = self.patch_emb(unit_pixels(patches).to(x.dtype)).to(x.dtype)
        flat = x.flatten(0, 1)
        if len(patch_index) == len(flat):  # padded to one a position: the padding rows land on a row dropped after
            padded = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
            return padded.index_copy(0, patch_index, projected)[:-1].view_as(x)
        return flat.index_copy(0, patch_index, projected).view_as(x)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        patches: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
        return_logits: bool = False,
        cache=None,
        last_logits: bool = False,
    ) -> ModelOutput:
        B, T = tokens.shape
        dev = tokens.device
        if self.check_inputs:
            self._check(tokens, patches, patch_mask, doc_ids, image_ids, targets, target_index)
        if positions is None:
            positions = torch.arange(T, device=dev).expand(B, T)
        if doc_ids is None:
            doc_ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        if image_ids is None:
            image_ids = torch.full((B, T), -1, dtype=torch.long, device=dev)

        with_patches = patches is not None and patches.shape[0] > 0
        patch_index = _patch_index(patch_mask, patches.shape[0]) if with_patches else None
        x = self.drop(self.embed(tokens, patches, patch_index))
        cos, sin = self.rotary(positions)
        decoding = cache is not None and cache.decoding  # new tokens attend to the cache; no mask to build
        mask = (
            None
            if decoding
            else AttentionMask.build(
                self.attention_backend(dev), doc_ids, image_ids, self.bidirectional_images, self.cfg.head_dim
            )
        )
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        if last_logits:  # a prefill wants the next token's logits only: B x V, not B x T x V in fp32
            if targets is not None:
                raise ValueError("last_logits computes no loss: pass targets or last_logits, not both")
            x = x[:, -1:]
        h = self.norm_f(x)
        out = ModelOutput()
        if return_logits or targets is None or self.telemetry:
            logits = self.lm_head(h).float()
            out.logits = logits if return_logits or targets is None else None
            if self.telemetry:  # an extra pass over B x T x V: only on the steps that log it
                out.logit_norm = logits.detach().norm(dim=-1).mean()
        if targets is None:
            return out
        out.text_loss, out.z_loss = self.text_losses(h, targets, target_index)
        out.image_loss = self._image_loss(h, patches, patch_index, image_ids)
        out.loss = out.text_loss + out.z_loss + self.cfg.image_loss_weight * out.image_loss
        return out

    def text_losses(
        self, h: torch.Tensor, targets: torch.Tensor, target_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on text targets and the z-loss, from the final hidden states, computed at the positions
        `target_index` lists (all positions without it). When a gradient is wanted, `model.cross_entropy` makes the
        logits' gradient in the forward pass. Otherwise (evaluation, ZeRO-3) one region on purpose: compiled
        (train.engine.apply_compile) it fuses the output matmul's upcast, log-sum-exp and gather instead of writing
        B x T x V fp32 logits and reading them back in several eager kernels."""
        h, targets = at_targets(h, targets, target_index)
        if self.loss_kernel and cross_entropy.usable(h, self.lm_head.weight):
            both, _, z = cross_entropy.linear_cross_entropy(h, self.lm_head.weight, targets, self.cfg.z_loss)
            return both - z, z  # the gradient flows through `both`, the sum the model's loss is made of
        logits = self.lm_head(h).float()
        valid = targets != IGNORE
        n = valid.sum().clamp(min=1)
        lse = torch.logsumexp(logits, dim=-1)
        target_logit = pick_targets(logits, targets)
        return ((lse - target_logit) * valid).sum() / n, self.cfg.z_loss * (lse.square() * valid).sum() / n

    def _image_loss(self, h, patches, patch_index, image_ids) -> torch.Tensor:
        if self.patch_head is None:
            return torch.zeros((), device=h.device)
        if patches is None or patches.shape[0] < 2:
            return _zero_touch(self.patch_head)
        return self._next_patch_loss(h, patches, patch_index, image_ids)

    def _next_patch_loss(self, h, patches, patch_index, image_ids):
        """AIMv2-style: each patch's output regresses the next patch of the same image (per-patch normalised)."""
        T = h.shape[1]
        rows = torch.arange(h.shape[0], device=h.device)[:, None] * (T + 1)
        real = patch_index < h.shape[0] * T  # not a padding row (patches padded to one a position)
        index = patch_index.clamp(max=h.shape[0] * T - 1)
        key = (rows + image_ids).flatten()[index]
        same_image = ((key[1:] == key[:-1]) & real[1:]).float()
        pred = self.patch_head(h.flatten(0, 1)[index[:-1]]).float()
        target = unit_pixels(patches[1:]).float()
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        err = (pred - target).square().mean(-1)
        return (err * same_image).sum() / same_image.sum().clamp(min=1)

    # ------------------------------------------------------------------------------------------- telemetry
    def track_attention_logits(self, on: bool = True):
        """Telemetry for the forwards that follow: each layer's largest attention logit (reset when switched on)
        and the output logits' norm, Chameleon's early warnings of divergence."""
        self.telemetry = on
        for block in self.blocks:
            block.attn.track_max_logit = on
            if on:
                block.attn.max_logit = None

    def max_attention_logit(self) -> torch.Tensor | None:
        values = [b.attn.max_logit for b in self.blocks if b.attn.max_logit is not None]
        return torch.stack(values).max() if values else None
