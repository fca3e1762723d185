"""Consolidated weights on disk: DIR/config.json (the ModelConfig) + DIR/model.safetensors. No DeepSpeed needed.
`load_pretrained` also reads the Hugging Face folder `python -m train.export --hf` writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.transformer import FusionTransformer


def save_pretrained(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return out


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> FusionTransformer:
    path = Path(path)
    if not (path / "config.json").exists() and (path / "export" / "config.json").exists():
        path = path / "export"  # a run directory, exported
    if not (path / "config.json").exists():
        hint = f": python -m train.export {path}" if (path / "checkpoints").is_dir() else ""
        raise FileNotFoundError(f"{path} holds no exported model (config.json, model.safetensors){hint}")
    config = json.loads((path / "config.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    if config.get("model_type") == "fusion":  # a Hugging Face folder of `train.export --hf`: ours under `fusion`
        config = config["fusion"]
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    elif "model_type" in config:
        raise ValueError(f"{path} holds a '{config['model_type']}' model, not one of this codebase's")
    cfg = ModelConfig.from_dict(config)
    model = FusionTransformer(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{path}: missing weights {sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}")
    return model.to(device).eval()
