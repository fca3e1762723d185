"""Shared fixtures: small configs and laid-out multimodal batches built with the real data layout code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


@pytest.fixture
def tiny_cfg():
    from model import ModelConfig

    return ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        patch_size=4,
        max_seq_len=128,
        attention_backend="sdpa",
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
