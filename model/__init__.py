"""The early-fusion decoder. Imports nothing from data/, train/ or DeepSpeed."""

from model.config import ConfigError, ModelConfig
from model.counting import flops_per_token, matmul_params, param_count
from model.generate import Generation, KVCache, append_text, generate
from model.pretrained import load_pretrained, save_pretrained
from model.transformer import IGNORE, FusionTransformer, InputError, ModelOutput


def build_model(cfg: ModelConfig | dict) -> FusionTransformer:
    """A freshly initialised model from a ModelConfig or a plain dict (YAML's `model:` section)."""
    return FusionTransformer(cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg))


__all__ = [
    "IGNORE",
    "ConfigError",
    "FusionTransformer",
    "Generation",
    "InputError",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "append_text",
    "build_model",
    "flops_per_token",
    "generate",
    "load_pretrained",
    "matmul_params",
    "save_pretrained",
    "param_count",
]
