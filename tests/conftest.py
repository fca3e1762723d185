"""Shared fixtures: small configs and laid-out multimodal batches built with the real data layout code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.layout import SpecialIds, layout_document
from data.packing import Packer, collate

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, img_start=3, img_end=4, row_sep=5, patch=6)
VOCAB = 64


def make_docs(rng: np.random.Generator, n: int, patch: int = 4, channels: int = 3):
    """Documents mixing text and images of varied aspect ratios."""
    docs = []
    for i in range(n):
        segs = [rng.integers(7, VOCAB, size=int(rng.integers(2, 8))).tolist()]
        if i % 3 != 2:
            h, w = patch * int(rng.integers(1, 4)), patch * int(rng.integers(1, 4))
            segs.insert(i % 2, rng.standard_normal((channels, h, w)).astype(np.float32))
        docs.append(segs)
    return docs


def packed_batch(seed=0, n_docs=6, seq_len=48, scheme="mrope", patch=4, rows=None):
    rng = np.random.default_rng(seed)
    packer = Packer(seq_len, SPECIAL.pad, 3 * patch * patch)
    out = []
    for segs in make_docs(rng, n_docs, patch):
        out += packer.add(layout_document(segs, SPECIAL, patch, scheme))
    out += packer.flush()
    return collate(out[:rows] if rows else out)


def tiny_model_config(**changes):
    """The tests' small model (2 layers of width 32, GQA 4:2, sdpa), with `changes` applied."""
    from model import ModelConfig

    values = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, patch_size=4, max_seq_len=128)
    return ModelConfig(**{**values, "attention_backend": "sdpa", **changes})


@pytest.fixture
def tiny_cfg():
    return tiny_model_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """A small build of the embedded dataset (real scenes, MNIST digits, Shakespeare, real tokenizer)."""
    from data.embedded import build

    out = tmp_path_factory.mktemp("embedded") / "data"
    build(out, scale=0.1, vocab_size=1024, cache=REPO / "artifacts" / "cache")
    return out


@pytest.fixture(scope="session")
def micro_config(embedded, tmp_path_factory) -> Path:
    """configs/tiny.yaml pointed at the test build of the embedded data, shrunk to seconds per run."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    root = str(embedded)
    for section in ("sources", "eval_sources"):
        for src in cfg["data"][section]:
            src["shards"] = src["shards"].replace("artifacts/data", root)
    cfg["data"]["eval_sources"] = cfg["data"]["eval_sources"][:2]
    cfg["data"].update(tokenizer=f"{root}/tokenizer.model", seq_len=64, batch_size=2, workers=1)
    cfg["model"].update(depth=2, vocab_size=1024, max_seq_len=64)
    cfg.update(steps=12)
    cfg["schedule"]["warmup_steps"] = 3
    cfg["checkpoint"] = {"every": 4, "keep": 2}
    cfg["logging"] = {"every": 1, "telemetry_every": 4, "tensorboard": True, "sample_log": True}
    cfg["eval"] = {"every": 6, "max_batches": 2}
    path = tmp_path_factory.mktemp("cfg") / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def mixture(root, **overrides):
    """The default caption / interleaved / text mixture over an embedded build."""
    from data.pipeline import DataConfig, SourceConfig

    values = dict(
        sources=[
            SourceConfig("caption", str(root / "scenes-caption" / "train"), 0.3),
            SourceConfig("digits", str(root / "digits" / "train"), 0.15),
            SourceConfig("qa", str(root / "scenes-qa" / "train"), 0.45),
            SourceConfig("text", str(root / "text" / "train"), 0.1),
        ],
        tokenizer=str(root / "tokenizer.model"),
        seq_len=128,
        batch_size=2,
        workers=2,
        patch_size=8,
    )
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture
def random_export(embedded, tmp_path):
    """A run directory holding the export of an untrained model with the embedded tokenizer (what `python -m
    infer` and `python -m evals` read): RUN/export/{config.json, model.safetensors, tokenizer.model}."""
    import shutil

    from model import build_model, save_pretrained

    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=1024, d_model=64, patch_size=8, max_image_patches=64, max_seq_len=256)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    export = save_pretrained(build_model(cfg).state_dict(), cfg, run / "export")
    shutil.copyfile(embedded / "tokenizer.model", export / "tokenizer.model")
    return run
