"""The study dataset: the same bytes whatever the workers, held-out pairs kept out of training, entropy floors
that match the process that draws the data, and shards the pipeline reads."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from data.study import DOC_WORDS, HELD_OUT, MarkovText, build, caption, sample, sample_scene


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "one"
    build(out, train=300, val=40, vocab_size=512, workers=1, shard_samples=100, tokenizer_samples=300)
    return out


def members(path: Path) -> list[dict]:
    with tarfile.open(path) as tar:
        return [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]


def test_build_is_the_same_bytes_with_any_number_of_workers(study, tmp_path):
    """Shards, manifests and tokenizer alike; the tokenizer skips NFKC, the one part of a sentencepiece model that
    differed between library versions (0.2.2 and 0.2.3) for the same corpus."""
    build(tmp_path / "two", train=300, val=40, vocab_size=512, workers=2, shard_samples=100, tokenizer_samples=300)
    files = sorted(p.relative_to(study) for p in study.rglob("*") if p.is_file() and p.name != "dataset.json")
    assert len(files) > 20 and not [f for f in files if ".part-" in str(f)]
    for f in files:
        assert (study / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    info = json.loads((study / "dataset.json").read_text())
    assert info["floors"] == json.loads((tmp_path / "two" / "dataset.json").read_text())["floors"]
    proto = sentencepiece_model_pb2.ModelProto()  # no table compiled from sentencepiece's own Unicode data
    proto.ParseFromString((study / "tokenizer.model").read_bytes())
    assert proto.normalizer_spec.precompiled_charsmap == b"" and proto.normalizer_spec.name == "identity"
    manifest = json.loads((study / "scenes-caption" / "train" / "manifest.json").read_text())
    assert manifest["samples"] == 300 and len(manifest["shards"]) == 3


def test_held_out_pairs_never_reach_training(study):
    for split, expect in (("train", False), ("heldout", True)):
        for shard in sorted((study / "scenes-caption" / split).glob("*.tar")):
            for meta in members(shard):
                pairs = {(o["color"], o["shape"]) for o in meta["objects"]}
                assert bool(pairs & HELD_OUT) == expect


def test_text_floor_is_the_chains_entropy():
    """The mean negative log-likelihood of sampled documents under the chain equals the computed entropy."""
    chain = MarkovText(0)
    index = {w: i for i, w in enumerate(chain.words)}
    nll = []
    for i in range(400):
        words = [index[w] for w in sample("text", "train", i, 0, chain)["txt"].rstrip(".").split()]
        assert len(words) == DOC_WORDS
        logp = math.log(chain.pi[words[0]])
        for a, b in zip(words, words[1:]):
            logp += math.log(chain.prob[a][list(chain.next[a]).index(b)])
        nll.append(-logp)
    nll = np.array(nll)
    assert abs(nll.mean() - chain.document_entropy()) < 4 * nll.std() / math.sqrt(len(nll))


def test_caption_order_is_uniform_and_complete():
    """The only freedom a caption has beyond its scene is the order of its n objects: n! equally likely ones."""
    scene = next(s for s in (sample_scene(np.random.default_rng(k), False) for k in range(100)) if len(s) == 3)
    seen = [caption(scene, np.random.default_rng(i)) for i in range(600)]
    counts = np.array(list({c: seen.count(c) for c in seen}.values()))
    assert len(counts) == math.factorial(3) and counts.min() > 60  # 100 expected each
    for c in seen[:5]:
        assert all(f"row {o['row']} column {o['col']}" in c for o in scene)


def test_pipeline_reads_the_study_shards(study):
    from data.pipeline import DataConfig, SourceConfig, StreamingLoader

    cfg = DataConfig(
        sources=[
            SourceConfig("caption", str(study / "scenes-caption" / "train"), 0.4),
            SourceConfig("qa", str(study / "scenes-qa" / "train"), 0.4),
            SourceConfig("text", str(study / "text" / "train"), 0.2),
        ],
        tokenizer=str(study / "tokenizer.model"),
        seq_len=256,
        batch_size=2,
        workers=0,
        patch_size=16,
    )
    batch = next(StreamingLoader(cfg, 0, 1))
    assert batch["tokens"].shape[-1] == 256 and int((batch["patches"].abs().sum(-1) > 0).sum()) > 0
