"""The study dataset: the same bytes whatever the workers, held-out pairs kept out of training, entropy floors
that match the process that draws the data, and shards the pipeline reads."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, mixture
from sentencepiece import sentencepiece_model_pb2

from data.study import DOC_FACTS, HELD_OUT, RELATIONS, FactText, build, caption, sample, sample_scene


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "one"
    build(
        out,
        train=300,
        val=40,
        vocab_size=512,
        workers=1,
        shard_samples=100,
        tokenizer_samples=300,
        prepared=out.parent / "prepared",
    )
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


def test_text_floor_is_the_fact_entropy():
    """Every sentence parses back into a fact of the table, and the mean negative log-likelihood of sampled
    documents under the process (a Zipf name, a uniform relation, the table's value) equals the computed entropy."""
    facts = FactText(0)
    index = {w: i for i, w in enumerate(facts.names)}
    nll = []
    for i in range(400):
        sentences = sample("text", "train", i, 0, facts)["txt"].removesuffix(".").split(". ")
        assert len(sentences) == DOC_FACTS
        logp = 0.0
        for sentence in sentences:
            name, *relation, value = sentence.split(" ")
            e, r = index[name], RELATIONS.index(" ".join(relation))
            assert value == facts.values[r][facts.table[e, r]]
            logp += math.log(facts.prob[e]) - math.log(len(RELATIONS))
        nll.append(-logp)
    nll = np.array(nll)
    assert abs(nll.mean() - facts.document_entropy()) < 4 * nll.std() / math.sqrt(len(nll))


def test_caption_order_is_uniform_and_complete():
    """The only freedom a caption has beyond its scene is the order of its n objects: n! equally likely ones."""
    scene = next(s for s in (sample_scene(np.random.default_rng(k), False) for k in range(100)) if len(s) == 3)
    seen = [caption(scene, np.random.default_rng(i)) for i in range(600)]
    counts = np.array(list({c: seen.count(c) for c in seen}.values()))
    assert len(counts) == math.factorial(3) and counts.min() > 60  # 100 expected each
    for c in seen[:5]:
        assert all(f"row {o['row']} column {o['col']}" in c for o in scene)


def test_pipeline_reads_the_study_shards_raw_or_prepared(study):
    """The study config reads the prepared copy; its batches are the raw shards' bit for bit."""
    import torch

    from data.pipeline import SourceConfig, StreamingLoader

    def first_batch(root: Path) -> dict:
        sources = [
            SourceConfig(name, str(root / directory / "train"), weight)
            for name, directory, weight in (
                ("caption", "scenes-caption", 0.4),
                ("qa", "scenes-qa", 0.4),
                ("text", "text", 0.2),
            )
        ]
        cfg = mixture(root, sources=sources, seq_len=256, workers=0, max_image_patches=64)
        return next(StreamingLoader(cfg, 0, 1))

    raw, prepared = first_batch(study), first_batch(study.parent / "prepared")
    assert raw["tokens"].shape[-1] == 256 and int((raw["patches"].abs().sum(-1) > 0).sum()) > 0
    assert raw.keys() == prepared.keys() and all(torch.equal(raw[k], prepared[k]) for k in raw)
    assert json.loads((study.parent / "prepared" / "dataset.json").read_text())["prepare_seconds"] >= 0


def test_the_layout_benchmark_runs_on_a_study_build(study):
    """`benchmarks/data_speed.py --layout`, the source of the skeleton's figure in docs/study/run3/STUDY.md, on the
    prepared study data: documents of few shapes (that is why a skeleton per shape pays)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from data_speed import layout

    r = layout(str(study.parent / "prepared"), documents=300, reps=1)
    assert r["us_whole"] > 0 and r["us_skeleton"] > 0 and 1 <= r["shapes"] < 300 / 3


def test_the_independent_processes_benchmark_runs_on_a_study_build(study):
    """`benchmarks/data_speed.py --independent`, the source of the host's figures in docs/study/STUDY.md: separate
    processes each make batches on a stream of their own, and the CPU time a row is each one's, averaged."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from data_speed import independent

    r = independent(str(study.parent / "prepared"), 2, 0.5)
    assert r["processes"] == 2 and r["rows_per_s"] > 0 and r["per_process"] == pytest.approx(r["rows_per_s"] / 2, 0.01)
    assert r["user_ms_per_row"] > 0 and r["sys_ms_per_row"] >= 0 and r["minor_faults_per_row"] >= 0
