"""The reasoning tasks and fine-tuning on them: items whose traces lead to their answers, held-out splits of unseen
combinations, byte-identical builds; chat samples whose only targets are the assistant's writing; objective=sft
and init_weights; the modes' evaluation next to its baselines."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model_config

from data.chat import ChatTokens
from data.embedded import HELD_OUT
from data.images import ImageSpec
from data.layout import layout_document
from data.pipeline import read_shard
from data.reasoning import HELD_OUT_DIGITS, TASKS, build, make_item, mnist_pools
from data.samples import to_segments
from data.shards import resolve_shards
from data.tokenizer import Tokenizer
from evals.reasoning import ReasoningTask, evaluate_modes
from model import build_model, save_pretrained
from train.config import ConfigError, load_config
from train.finetune import load_weights


@pytest.fixture(scope="module")
def reasoning(tmp_path_factory):
    out = tmp_path_factory.mktemp("reasoning") / "r"
    build(out, train=40, val=12, seed=0)
    return out


def samples(root: Path, task: str, split: str) -> list[dict]:
    return [s for shard in resolve_shards(str(root / task / split)) for s in read_shard(shard, Counter())]


def test_builds_are_byte_identical_under_a_seed(reasoning, tmp_path):
    again = tmp_path / "again"
    build(again, train=40, val=12, seed=0)
    digest = lambda root: {  # noqa: E731
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.tar"))
    }
    assert digest(reasoning) == digest(again) and len(digest(again)) == 4 * 3


def test_traces_lead_to_their_answers():
    pools = mnist_pools(0)
    for i in range(40):
        arith = make_item("arith", "train", i, 0, pools)
        expr = arith["question"].removeprefix("what is ").removesuffix("?")
        assert int(arith["answer"]) == eval(expr)  # noqa: S307 - digits, + and - only
        assert arith["trace"].endswith(f"= {arith['answer']}.")
        digits = make_item("digitsum", "train", i, 0, pools)
        read = [int(d) for d in re.findall(r"(?:top|bottom) (?:left|right): (\d)\.", digits["trace"])]
        assert len(read) == 4 and sum(read) == int(digits["answer"])
        count = make_item("count", "train", i, 0, pools)
        assert count["trace"].endswith(f"That makes {count['answer']}.")
        kind = re.match(r"how many (\w+?)s? (?:shapes )?are there\?", count["question"]).group(1)
        listed = re.findall(r"(?:top|middle|bottom) (?:left|center|right): a (\w+) (\w+) (\w+)\.", count["trace"])
        assert sum(kind in (color, shape) for _, color, shape in listed) == int(count["answer"])
        hop = make_item("twohop", "train", i, 0, pools)
        last = hop["trace"].split(". ")[-1]
        assert (hop["answer"] == "nothing") == ("nothing" in last or "no cell" in last)
        assert hop["answer"] == "nothing" or last.endswith(f"{hop['answer']}.")


def test_held_out_splits_hold_unseen_combinations():
    pools = mnist_pools(0)
    pairs = lambda trace: set(re.findall(r": a \w+ (\w+) (\w+)\.", trace))  # noqa: E731
    for i in range(30):
        assert pairs(make_item("count", "heldout", i, 0, pools)["trace"]) & HELD_OUT
        assert not pairs(make_item("count", "train", i, 0, pools)["trace"]) & HELD_OUT
        for split, held in (("heldout", True), ("train", False)):
            nums = [int(v) for v in re.findall(r"\d+", make_item("arith", split, i, 0, pools)["question"])]
            assert ((nums[0] % 10, nums[1] % 10) in HELD_OUT_DIGITS) == held


def test_a_chat_samples_only_targets_are_the_assistants_writing(reasoning, embedded):
    tok = Tokenizer(embedded / "tokenizer.model")
    t = ChatTokens.of(tok)
    for task in TASKS:
        s = samples(reasoning, task, "train")[0]
        kind, segments = to_segments(s, tok.encode, ImageSpec(8, 64), tok=tok)
        doc = layout_document(segments, tok.special, 8)
        targets = doc.targets[doc.targets >= 0].tolist()
        msg = json.loads(s["json"])["messages"][1]
        body = [t.think, *tok.encode(msg["thought"]), t.end_think, t.answer, *tok.encode(msg["content"])]
        assert kind == "chat" and targets == [*body, t.end_answer, tok.special.eos]
        assert t.user in doc.tokens.tolist() and (t.assistant in doc.tokens.tolist())


def test_sft_needs_a_start_and_chat_data(micro_config, reasoning, random_export):
    with pytest.raises(ConfigError, match="objective=sft fine-tunes a model"):
        load_config(micro_config, ["objective=sft"])
    with pytest.raises(ConfigError, match="objective='dpo'"):
        load_config(micro_config, ["objective=dpo"])
    cfg = load_config(micro_config, ["objective=sft", f"init_weights={random_export}"])
    assert cfg.data.kinds == ["chat"]


def test_init_weights_loads_an_export_and_refuses_another_shape(random_export):
    exported = json.loads((random_export / "export" / "config.json").read_text())
    cfg = tiny_model_config(**{k: exported[k] for k in ("vocab_size", "d_model", "patch_size", "max_image_patches")})
    torch.manual_seed(1)
    model = build_model(cfg)
    load_weights(model, str(random_export))
    from model import load_pretrained

    ref = load_pretrained(random_export)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))
    with pytest.raises(ConfigError, match="d_model: 64 there, 32 here"):
        load_weights(
            build_model(tiny_model_config(**{**exported, "d_model": 32, "n_heads": 1, "n_kv_heads": 1})),
            str(random_export),
        )


def test_modes_are_scored_next_to_their_baselines(reasoning, random_export, embedded):
    from model import load_pretrained

    model = load_pretrained(random_export)
    tok = Tokenizer(embedded / "tokenizer.model")
    task = ReasoningTask("count")
    items = task.items(reasoning, 4)
    r = evaluate_modes(model, tok, task, items, ("instant", "thinking", "contemplating"), chains=3, max_new_tokens=8)
    assert set(r["modes"]) == {"instant", "thinking", "contemplating"} and r["items"] == 4
    c = r["modes"]["contemplating"]
    assert c["pass@3"] >= c["majority_vote"] and 0 <= c["accuracy"] <= 1
    for m in r["modes"].values():  # each accuracy inside its 95% interval over the 4 items
        assert (
            m["accuracy_95"][0] <= m["accuracy"] <= m["accuracy_95"][1]
            and m["accuracy_95"][1] - m["accuracy_95"][0] > 0.3
        )
    assert r["modes"]["instant"]["thought_tokens"] == 0  # instant's thought is empty by construction
    assert set(r["baselines"]) == {"majority answer", "instant without the image"}
    majority = Counter(it.reference for it in items).most_common(1)[0][1] / 4
    assert r["baselines"]["majority answer"] == pytest.approx(majority)
    assert np.isfinite(r["modes"]["thinking"]["thought_tokens"])


@pytest.mark.distributed
def test_sft_runs_under_torchrun_from_an_export_on_chat_data_only(micro_config, reasoning, tmp_path):
    """Two ranks under ZeRO-2 fine-tune an export on the reasoning tasks: every sample read is a chat sample, the
    validation reports each task, and the run resumes like any other (a second launch continues from step 4)."""
    from test_train import launch

    cfg = load_config(micro_config)
    torch.manual_seed(0)
    export = save_pretrained(build_model(cfg.model).state_dict(), cfg.model, tmp_path / "start" / "export")
    tasks = ("count", "arith")
    sources = ", ".join(f"{{name: {t}, shards: '{reasoning / t / 'train'}', weight: 1}}" for t in tasks)
    evals = ", ".join(f"{{name: {t}, shards: '{reasoning / t / 'val'}'}}" for t in tasks)
    common = ["objective=sft", f"init_weights={export.parent}", f"data.sources=[{sources}]"]
    common += [f"data.eval_sources=[{evals}]", "data.seq_len=256", "model.max_seq_len=256", "eval.every=0"]
    run = tmp_path / "sft"
    first = launch(micro_config, run, *common, "steps=4", "logging.sample_log=false")
    assert first.returncode == 0, first.stdout + first.stderr
    second = launch(micro_config, run, *common, "steps=6", "logging.sample_log=false")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "at step 4" in second.stdout
    summary = json.loads((run / "summary.json").read_text())
    kinds = {k for k, v in summary["data_counts"].items() if k.startswith("kind/") and v}
    assert kinds == {"kind/chat"} and summary["steps"] == 6
    assert set(summary["final_val"]) >= {"count/text_loss", "arith/text_loss"}


def test_synthesis_sets_from_the_models_own_samples_train_only_the_answer(reasoning, random_export, embedded, tmp_path):
    """infer.synthesis: each training item becomes a synthesis turn whose given thought lists the model's N answers
    (read, not a target) and whose answer is the reference; the share of sets with a wrong majority is recorded."""
    from infer.synthesis import build as build_synthesis
    from model import load_pretrained

    tok = Tokenizer(embedded / "tokenizer.model")
    t = ChatTokens.of(tok)
    out = tmp_path / "synth"
    stats = build_synthesis(
        load_pretrained(random_export), tok, reasoning, out, items=3, chains=2, batch=2, seed=0, max_new=6
    )
    assert set(stats) == set(TASKS) and all(s["sets"] == 3 and 0 <= s["majority_wrong"] <= 1 for s in stats.values())
    for task in TASKS:
        got = samples(out, task, "train")
        assert len(got) == 3
        meta = json.loads(got[0]["json"])
        turn = meta["messages"][1]
        assert (
            turn["thought_given"] and turn["thought"].startswith("Candidate 1: ") and "Candidate 2: " in turn["thought"]
        )
        kind, segments = to_segments(got[0], tok.encode, ImageSpec(8, 64), tok=tok)
        doc = layout_document(segments, tok.special, 8)
        assert doc.targets[doc.targets >= 0].tolist() == [*tok.encode(meta["answer"]), t.end_answer, tok.special.eos]


def test_the_reasoning_doc_quotes_the_committed_measurements():
    """docs/REASONING.md's tables are what evals.reasoning.modes_markdown makes of the committed JSON."""
    from conftest import REPO

    from evals.reasoning import modes_markdown

    doc = (REPO / "docs" / "REASONING.md").read_text()
    for run in ("sft-demo", "sft-synthesis"):
        results = json.loads((REPO / "docs" / "reasoning" / f"modes-{run}.json").read_text())
        assert modes_markdown(results) in doc
    sets = json.loads((REPO / "docs" / "reasoning" / "synthesis-sets.json").read_text())["tasks"]
    for task, v in sets.items():
        assert f"| {task} | {v['sets']} | {v['majority_wrong']:.1%} | {v['none_right']:.1%} |" in doc
    for device in ("cpu", "gpu"):
        latency = json.loads((REPO / "docs" / "reasoning" / f"latency-{device}.json").read_text())["modes"]
        for mode, v in latency.items():
            assert f"| {mode} | {v['requests']} | {v['median_s']:.3f} | {v['mean_s']:.3f} |" in doc
