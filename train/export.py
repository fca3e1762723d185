"""Consolidate a DeepSpeed checkpoint (any ZeRO stage) into safetensors + the model config, for inference
without DeepSpeed: `python -m train.export RUN_DIR [--checkpoint DIR] [--out DIR]` (default RUN_DIR/export),
then `model.load_pretrained(DIR)`. `--hf OUT` also writes a Hugging Face folder (remote code, the whole model),
`--hf-text OUT` one of a stock architecture for text (train.hf.export)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import yaml

from model import ModelConfig, save_pretrained
from train.checkpoint import Checkpointer


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights: DeepSpeed's own ZeRO consolidation, or the module states of a stage-0 checkpoint."""
    if any(checkpoint.glob("*optim_states.pt")) and any(checkpoint.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export(run_dir: str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None) -> Path:
    run = Path(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else Checkpointer(run / "checkpoints", 1, 0).latest()
    if checkpoint is None:
        raise FileNotFoundError(f"{run}/checkpoints has no complete checkpoint")
    config = yaml.safe_load((run / "config.yaml").read_text())
    model_cfg = ModelConfig.from_dict(config["model"])
    written = save_pretrained(consolidated_state_dict(checkpoint), model_cfg, out or run / "export")
    tokenizer = Path(config.get("data", {}).get("tokenizer", ""))
    if tokenizer.is_file():  # the model's ids mean nothing without it
        shutil.copyfile(tokenizer, Path(written) / "tokenizer.model")
    return written


def at_end(run: Path, hf: bool, hf_text: bool) -> list[Path]:
    """A finished run's exports (`export:` in its config): RUN/export, then RUN/hf and RUN/hf-text as asked."""
    if not (hf or hf_text):
        return []
    from train.hf.export import hf as write_hf
    from train.hf.export import hf_text as write_hf_text

    written = [export(run)]
    if hf:
        written.append(write_hf(written[0], run / "hf"))
    if hf_text:
        written.append(write_hf_text(written[0], run / "hf-text"))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint")
    ap.add_argument("--out")
    ap.add_argument("--hf", metavar="OUT", help="also write a transformers folder (trust_remote_code=True)")
    ap.add_argument("--hf-text", metavar="OUT", help="also write a stock Llama/Qwen3 folder for text (no remote code)")
    args = ap.parse_args(argv)
    written = export(args.run_dir, args.checkpoint, args.out)
    print(f"exported {written}")
    from train.hf.export import ExportError, hf, hf_text

    try:
        if args.hf:
            print(f"transformers folder {hf(written, args.hf)}")
        if args.hf_text:
            print(f"transformers text folder {hf_text(written, args.hf_text)}")
    except ExportError as e:
        raise SystemExit(f"not exported: {e}") from None


if __name__ == "__main__":
    main()
