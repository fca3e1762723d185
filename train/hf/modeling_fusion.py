"""The exported model for transformers: `FusionTransformer` under `PreTrainedModel` and `GenerationMixin`.

Inputs are the batch the data layer lays out (`AutoProcessor` makes it): `input_ids` (tokens), `positions` ((B, T, 3)
M-RoPE ids, or (B, T) for 1-D RoPE; not `position_ids`, which `generate` extends as 1-D text positions),
`pixel_patches` (P, C*p*p), `patch_mask`, `image_ids`, `doc_ids`.
Text alone needs only `input_ids` (and `attention_mask` for padded batches: padding becomes a document of its own
and positions restart after it, as `infer.Engine` lays out left-padded prompts). `generate` recomputes the whole
prefix each step (no KV cache here; `infer` is the fast path) and extends the image inputs with the new text.
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.config import ModelConfig
from model.rope import Rotary
from model.transformer import IGNORE, FusionTransformer

from .configuration_fusion import FusionConfig


class FusionForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FusionConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}  # used when tie_word_embeddings

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        self.model = FusionTransformer(ModelConfig.from_dict(config.fusion))
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the checkpoint; only the buffers, which are not saved, are set here: the rotary tables
        and the image-mask flag."""
        if isinstance(module, FusionTransformer):
            with torch.no_grad():
                module.bidirectional_images.fill_(module.cfg.image_mask == "bidirectional")
        if isinstance(module, Rotary):
            cfg = ModelConfig.from_dict(self.config.fusion)
            with torch.device("cpu"):  # transformers builds the model on the meta device first
                fresh = Rotary(cfg.head_dim, cfg.rope_sections, cfg.rope_theta, cfg.mrope_interleaved)
            with torch.no_grad():
                module.inv_freq.copy_(fresh.inv_freq)
                module.component.copy_(fresh.component)

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value):
        self.model.tok_emb = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        pixel_patches: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if positions is None and position_ids is not None and position_ids.dim() == 2:
            positions = position_ids  # transformers' 1-D text positions
        if attention_mask is not None and doc_ids is None and not bool(attention_mask.all()):
            doc_ids = (attention_mask == 0).long()  # padding (left or right) is a document of its own
            if positions is None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids,
            patches=pixel_patches,
            patch_mask=patch_mask,
            positions=positions,
            doc_ids=doc_ids,
            image_ids=image_ids,
            return_logits=True,
        )
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(
                out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(out.logits.device), ignore_index=IGNORE
            )
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The whole sequence each step; image inputs given for the prompt are extended over the new tokens (text:
        no patch, no image, the last document, positions one past the largest so far, as data.layout places text)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        names = ("positions", "pixel_patches", "patch_mask", "image_ids", "doc_ids")
        inputs.update({k: kwargs[k] for k in names if kwargs.get(k) is not None})
        new = input_ids.shape[1] - (inputs["patch_mask"].shape[1] if "patch_mask" in inputs else input_ids.shape[1])
        if new > 0:
            B, dev = input_ids.shape[0], input_ids.device
            step = torch.arange(1, new + 1, device=dev)
            if "patch_mask" in inputs:
                inputs["patch_mask"] = torch.cat([inputs["patch_mask"], inputs["patch_mask"].new_zeros(B, new)], 1)
            if "image_ids" in inputs:
                inputs["image_ids"] = torch.cat([inputs["image_ids"], inputs["image_ids"].new_full((B, new), -1)], 1)
            if "doc_ids" in inputs:
                inputs["doc_ids"] = torch.cat([inputs["doc_ids"], inputs["doc_ids"][:, -1:].expand(B, new)], 1)
            if "positions" in inputs:
                pos = inputs["positions"]
                last = pos.flatten(1).max(1).values[:, None]  # the largest id so far, per row
                more = last + step[None]
                inputs["positions"] = torch.cat([pos, more[..., None].expand(B, new, 3) if pos.dim() == 3 else more], 1)
        return inputs
