"""The model's typed configuration, its validation, and the one size dial (`depth`) the sweeps turn."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

POSITION_SCHEMES = ("mrope", "rope1d")  # M-RoPE (t, h, w) or 1-D RoPE with a row-separator token (Fuyu)
IMAGE_MASKS = ("bidirectional", "causal")  # attention inside an image
ATTENTION_BACKENDS = ("auto", "flex", "sdpa", "flash")
NORM_ORDERS = ("pre", "post")  # post = Chameleon's norm after each sublayer, inside the residual


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it and the limit."""


def closest_key(name: str, valid: list[str]) -> str:
    """Return a ' (did you mean X?)' hint, or '' when nothing is close."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def from_mapping(cls, values: dict[str, Any], where: str = ""):
    """Build dataclass `cls` from a dict, refusing unknown keys with the closest valid one named."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown option '{where}{key}' for {cls.__name__}{closest_key(key, names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            if isinstance(value, list) and f.type.startswith("tuple"):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


@dataclass
class ModelConfig:
    # Size. `depth` is the dial: when set, width, heads and MLP size follow from it (see `from_depth`).
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # grouped-query attention when < n_heads
    mlp_hidden: int = 0  # 0: SwiGLU hidden size 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    # Images: patches of patch_size x patch_size x channels, linearly embedded into the residual stream.
    patch_size: int = 8
    channels: int = 3
    max_image_patches: int = 1024  # per image, after the data layer's resize
    position_scheme: str = "mrope"
    mrope_sections: tuple[int, int, int] = (0, 0, 0)  # rotary pairs for (t, h, w); zeros: 1/4, 3/8, 3/8
    # Deal M-RoPE's pairs to t, h, w in turn (pair i to axis i % 3) instead of in contiguous sections, so that each
    # image axis gets high frequencies too: contiguous sections leave the columns only the lowest 3/8 (the fastest
    # turns theta^-0.625 = 0.0032 rad a column at any head size; docs/study/study4/STUDY.md). Qwen3-VL's interleaved
    # M-RoPE is the same idea.
    mrope_interleaved: bool = False
    rope_theta: float = 10000.0
    # Attention.
    image_mask: str = "bidirectional"
    attention_backend: str = "auto"  # auto: flash-attn if importable and usable, else flex on CUDA, else sdpa
    qk_norm: bool = True
    # Blocks and stability.
    norm_order: str = "pre"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    init_std: float = 0.02  # output projections get init_std / sqrt(2 * n_layers)
    # Loss.
    z_loss: float = 1e-4
    image_loss_weight: float = 0.0  # > 0 turns on AIMv2-style next-patch regression (needs image_mask=causal)
    extra: dict = field(default_factory=dict)  # free-form notes carried with the config, never read by the model

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size * self.patch_size

    @property
    def ffn_hidden(self) -> int:
        return self.mlp_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def rope_sections(self) -> tuple[int, int, int]:
        """Rotary frequency pairs driven by the (t, h, w) position ids; they sum to head_dim // 2."""
        pairs = self.head_dim // 2
        if self.position_scheme == "rope1d":
            return (pairs, 0, 0)
        if any(self.mrope_sections):
            return tuple(self.mrope_sections)
        h = (3 * pairs) // 8
        return (pairs - 2 * h, h, h)

    def validate(self) -> None:
        for name, allowed in (
            ("position_scheme", POSITION_SCHEMES),
            ("image_mask", IMAGE_MASKS),
            ("attention_backend", ATTENTION_BACKENDS),
            ("norm_order", NORM_ORDERS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}='{value}' is not one of {allowed}{closest_key(str(value), list(allowed))}")
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "max_seq_len",
            "patch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.mrope_interleaved and (self.position_scheme != "mrope" or any(self.mrope_sections)):
            raise ConfigError(
                "mrope_interleaved deals M-RoPE's pairs to the axes in turn: it needs position_scheme='mrope' and "
                f"no mrope_sections (got position_scheme='{self.position_scheme}', mrope_sections="
                f"{tuple(self.mrope_sections)})"
            )
        sections = self.rope_sections
        if len(sections) != 3 or sum(sections) != self.head_dim // 2 or min(sections) < 0:
            raise ConfigError(
                f"mrope_sections={tuple(self.mrope_sections)} must be three non-negative counts summing to "
                f"head_dim // 2 = {self.head_dim // 2}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.image_loss_weight < 0 or self.z_loss < 0:
            raise ConfigError("image_loss_weight and z_loss must be >= 0")
        if self.image_loss_weight > 0 and self.image_mask == "bidirectional":
            raise ConfigError(
                "image_loss_weight > 0 (next-patch prediction) with image_mask='bidirectional' leaks the target: "
                "every patch would see the patch it predicts. Set image_mask='causal' or image_loss_weight=0."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        values = dict(values)
        depth = values.pop("depth", None)
        if depth is not None:
            sized = dataclasses.asdict(
                cls.from_depth(depth, **{k: values[k] for k in ("aspect", "head_dim") if k in values})
            )
            values.pop("aspect", None)
            values.pop("head_dim", None)
            sized.update(values)  # explicit keys win over the dial
            values = sized
        return from_mapping(cls, values, where="model.")

    @classmethod
    def from_depth(cls, depth: int, aspect: int = 64, head_dim: int = 64, **overrides) -> ModelConfig:
        """nanochat's dial: width = aspect * depth, heads of `head_dim`, everything else from the defaults.

        Depth 2 gives a 128-wide toy for CPU tests; depth 12 gives a GPT-2-small-shaped 768-wide model.
        """
        if depth < 1:
            raise ConfigError(f"depth={depth} must be >= 1")
        d_model = aspect * depth
        n_heads = max(1, d_model // head_dim)
        values = dict(d_model=d_model, n_layers=depth, n_heads=n_heads, n_kv_heads=n_heads)
        values.update(overrides)
        return cls(**values)
