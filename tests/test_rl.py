"""RL post-training (train/rl.py): group advantages, the length terms against their sources' definitions, and real
runs of `train.py` with `objective: rl` in which the length term shortens thoughts and zero penalty changes
nothing, and a resumed run continues the uninterrupted run's curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from model import build_model, load_pretrained, save_pretrained
from train.config import ConfigError, load_config
from train.length_penalty import length_rewards
from train.rl import group_advantages


def test_advantages_within_a_group_sum_to_zero():
    for rewards in ([1.0, 0.0, 0.0, 1.0, 0.3], [0.2, 0.9], [-0.5, 0.5, 0.1, 0.1]):
        adv = group_advantages(rewards)
        assert sum(adv) == pytest.approx(0.0, abs=1e-9)
        assert [a > 0 for a in adv] == [r > sum(rewards) / len(rewards) for r in rewards]
    assert group_advantages([0.7] * 6) == [0.0] * 6  # all alike: nothing to learn from the group


def test_length_terms_follow_their_sources():
    lengths, correct = [10, 20, 30, 40], [True, True, False, False]
    kimi = length_rewards("kimi", lengths, correct, alpha=1.0)
    assert kimi[0] == pytest.approx(0.5) and kimi[1] == pytest.approx(0.5 - 1 / 3)
    assert kimi[2] == pytest.approx(min(0.0, 0.5 - 2 / 3)) and kimi[3] == pytest.approx(-0.5)
    assert length_rewards("kimi", [5, 5], [True, False], 1.0) == [0.0, 0.0]
    assert max(length_rewards("kimi", [1, 9], [False, False], 1.0)) == 0.0  # a short wrong answer earns nothing
    sig = length_rewards("sigmoid", [10, 30, 20, 50], [True, True, False, False], alpha=0.4)
    assert sig[2] == sig[3] == 0.0  # wrong samples: no length term
    assert -0.4 < sig[1] < -0.2 < sig[0] < 0.0  # the shorter right sample keeps more of its reward
    dapo = length_rewards("dapo", [10, 90, 95, 100, 120], [True] * 5, 1.0, max_len=100, cache=20)
    assert dapo == [0.0, pytest.approx(-0.5), pytest.approx(-0.75), pytest.approx(-1.0), -1.0]
    l1 = length_rewards("l1", [10, 40], [True, False], 0.01, targets=[20, 20])
    assert l1 == [pytest.approx(-0.1), pytest.approx(-0.2)]
    assert length_rewards("none", lengths, correct, 5.0) == [0.0] * 4


def test_rl_configs_are_checked(micro_config):
    with pytest.raises(ConfigError, match="penalty"):
        load_config(micro_config, ["objective=rl", "init_weights=x", "rl.penalty=shortest"])
    with pytest.raises(ConfigError, match="group"):
        load_config(micro_config, ["objective=rl", "init_weights=x", "rl.group=1"])
    with pytest.raises(ConfigError, match="init_weights"):
        load_config(micro_config, ["objective=rl"])
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(micro_config, ["objective=rl", "init_weights=x", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="groups_per_micro"):
        load_config(micro_config, ["objective=rl", "init_weights=x", "rl.groups_per_micro=0"])


@pytest.fixture(scope="module")
def start(micro_config, tmp_path_factory):
    """A start whose thoughts end at varied lengths, so a length term has something to shorten: a random model
    whose output reads one feature of the final hidden state, through which only </think> is lifted (every other
    token stays at logit 0). The arithmetic task's answers are all wrong for it: only the length term can move it.
    Returns the runs' config overrides and the start's export."""
    from data.reasoning import build
    from data.tokenizer import Tokenizer

    cfg = load_config(micro_config)
    data = tmp_path_factory.mktemp("reasoning") / "r"
    build(data, train=40, val=12, seed=0)
    end_think = Tokenizer(cfg.data.tokenizer).token_id("</think>")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[end_think, 0] = 6.0
    export = save_pretrained(model.state_dict(), cfg.model, tmp_path_factory.mktemp("start") / "export")
    overrides = [
        "objective=rl",
        f"init_weights={export.parent}",
        f"rl.data={data}",
        "rl.tasks=[arith]",
        "rl.prompts=2",
        "rl.group=8",
        "rl.max_new_tokens=24",
        "rl.eval_items=2",
        "optim.lr=0.05",
        "optim.weight_decay=0",
        "schedule.kind=constant",
        "checkpoint.every=0",
        "logging.every=1",
        "logging.sample_log=false",
        "logging.tensorboard=false",
        "eval.every=0",
        "data.seq_len=256",
        "model.max_seq_len=256",
    ]
    return SimpleNamespace(overrides=overrides, export=export)


def rl_run(micro_config, run, start, *extra):
    cmd = [sys.executable, "train.py", "--config", str(micro_config), *start.overrides, f"run_dir={run}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_length_term_shortens_thoughts_and_zero_penalty_changes_nothing(micro_config, start, tmp_path):
    _, kimi = rl_run(micro_config, tmp_path / "kimi", start, "steps=10", "rl.penalty=kimi", "rl.alpha=1.0")
    first = sum(r["thought_tokens"] for r in kimi[:3]) / 3
    last = sum(r["thought_tokens"] for r in kimi[-3:]) / 3
    assert last < 0.6 * first, [round(r["thought_tokens"], 1) for r in kimi]
    assert all(r["correct"] == 0 for r in kimi)  # it was the length term, not the answers
    held = kimi[-1]  # the end's held-out evaluation: accuracy next to the blind majority answer on the same items
    assert held["heldout/arith/accuracy"] == 0 and 0 < held["heldout/arith/baseline/majority_answer"] <= 1
    _, none = rl_run(micro_config, tmp_path / "none", start, "steps=4", "rl.penalty=none")
    assert all(r["loss"] == 0 for r in none)  # equal rewards in every group: zero advantages, no update
    (saved,) = (tmp_path / "none" / "checkpoints").glob("step_*/*model_states.pt")
    state = torch.load(saved, weights_only=False)["module"]
    initial = load_pretrained(start.export).state_dict()
    assert initial.keys() == state.keys() and all(torch.equal(state[k], v) for k, v in initial.items())


def test_the_reports_cut_gives_each_task_its_own_budget(micro_config, start):
    """benchmarks/rl_report.py's cut baseline: a budget per task (0: the thought closed at once) cuts each task's
    thoughts at its own length; the same budget for every task is the single-budget cut."""
    from benchmarks.rl_report import cut_thoughts
    from data.tokenizer import Tokenizer
    from train.rl import Prompts

    cfg = load_config(str(micro_config), [*start.overrides, "rl.tasks=[arith,count]"])
    model, tok = load_pretrained(start.export).eval(), Tokenizer(cfg.data.tokenizer)
    held_out = Prompts(cfg, "heldout", 4)
    whole = cut_thoughts(model, tok, held_out, 6)
    assert 0 < whole["thought_tokens"] <= 6  # some thought to cut, none past the budget
    same = cut_thoughts(model, tok, held_out, {"arith": 6, "count": 6})
    assert same.pop("budget") == {"arith": 6, "count": 6} and same == {k: v for k, v in whole.items() if k != "budget"}
    assert cut_thoughts(model, tok, held_out, {"arith": 0, "count": 0})["thought_tokens"] == 0
    arith_only = cut_thoughts(model, tok, held_out, {"arith": 6, "count": 0})
    count_only = cut_thoughts(model, tok, held_out, {"arith": 0, "count": 6})
    assert arith_only["thought_tokens"] + count_only["thought_tokens"] == pytest.approx(
        whole["thought_tokens"], abs=0.011
    )
    assert set(whole["per_task_accuracy"]) == {"arith", "count"}


def test_a_resumed_rl_run_and_batched_groups_continue_the_same_curve(micro_config, start, tmp_path):
    """A run stopped at step 3 and resumed gives the uninterrupted run's curve; so does rl.groups_per_micro=2,
    which puts both prompts' groups in one forward (one micro-batch instead of two: the same token-level
    objective)."""
    args = ("rl.penalty=kimi", "rl.alpha=1.0")
    _, whole = rl_run(micro_config, tmp_path / "whole", start, "steps=6", *args)
    rl_run(micro_config, tmp_path / "parts", start, "steps=3", *args)
    out, parts = rl_run(micro_config, tmp_path / "parts", start, "steps=6", *args)
    assert "resumed from" in out.stdout and "at step 3" in out.stdout
    assert [r["step"] for r in parts] == [r["step"] for r in whole] == list(range(1, 7))
    for key in ("reward", "thought_tokens", "loss"):
        assert [r[key] for r in parts] == pytest.approx([r[key] for r in whole], rel=1e-6, abs=1e-9), key
    assert len({r["thought_tokens"] for r in whole}) > 1  # a curve that moves, not a constant
    _, together = rl_run(micro_config, tmp_path / "together", start, "steps=6", *args, "rl.groups_per_micro=2")
    config = (tmp_path / "together" / "config.yaml").read_text()
    assert "grad_accum: 1" in config and "grad_accum: 2" in (tmp_path / "whole" / "config.yaml").read_text()
    for key in ("reward", "thought_tokens"):
        assert [r[key] for r in together] == [r[key] for r in whole], key
    assert [r["loss"] for r in together] == pytest.approx([r["loss"] for r in whole], rel=1e-4, abs=1e-7)
    assert any(r["loss"] != 0 for r in whole)  # there was an update to compare


def test_the_gpu_split_in_the_docs_is_the_committed_json():
    data = json.loads((REPO / "docs" / "rl" / "gpu_h200.json").read_text())
    text = (REPO / "docs" / "RL.md").read_text()
    for name, rows in data["runs"].items():
        rows = rows[1:]  # step 1 holds the warm-up
        r, u = (sum(x[k] for x in rows) / len(rows) for k in ("rollout_s", "update_s"))
        tps = sum(x["rollout_tokens_per_s"] for x in rows) / len(rows)
        assert f"| {name} | {r:.3f} | {u:.3f} | {r / (r + u):.1%} | {tps:,.0f} |" in text


def test_the_cpu_study_in_the_docs_is_the_committed_json():
    """docs/RL.md's table, cut baseline, blind baseline and verdicts are docs/rl/curves.json's."""
    data = json.loads((REPO / "docs" / "rl" / "curves.json").read_text())
    text = (REPO / "docs" / "RL.md").read_text()

    def acc(x):
        return f"{x['accuracy']:.3f} [{x['accuracy_95'][0]:.3f}, {x['accuracy_95'][1]:.3f}]"

    start = data["start"]
    assert f"| the start (no RL) | 0 | {acc(start)} | {start['thought_tokens']:.2f} |" in text
    for alpha, curve in data["curves"].items():
        assert len(curve["seeds"]) == 3
        for step, row in curve["heldout"].items():
            seeds = ", ".join(f"{v:.2f}" for v in row["per_seed_accuracy"])
            assert f"| {alpha} | {step} | {acc(row)} | {row['thought_tokens']:.2f} | {seeds} |" in text
            assert row["items"] == 3 * 100  # the interval is over every answer of every seed
    assert f"| blind: each task's majority answer | | {acc(data['blind_majority_answer'])} |" in text
    for cut in data["cut_baseline"]:
        assert f"| {cut['budget']} thought tokens | {acc(cut)} |" in text
    final = {a: c["heldout"][max(c["heldout"], key=int)] for a, c in data["curves"].items()}
    assert all(final[a]["thought_tokens"] == 0 for a in final if a != "0") and "collapse to nothing" in text
    assert not any(d["dipped"] for d in data["dip_and_recover"].values()) and "No dip and recovery" in text
    assert max(v["accuracy"] for v in final.values()) < data["blind_majority_answer"]["accuracy"]
    assert "Everything is below the blind baseline" in text


GPU = REPO / "docs" / "rl" / "gpu"


def _acc(x: dict, key: str = "accuracy") -> str:
    lo, hi = x[f"{key}_95"]
    return f"{x[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def test_the_gpu_study_is_its_runs_and_its_configs():
    """The committed RL runs are the configs' (tiny + rl-demo + think-gpu + rl-think-gpu with the script's
    overrides), and curves.json's held-out curves are what rl_report's pooling makes of their metrics."""
    from benchmarks.rl_report import pooled, runs

    data = json.loads((GPU / "curves.json").read_text())
    grid = runs(GPU / "runs")
    assert sorted(grid) == [(a, s) for a in (0.0, 0.25, 0.5) for s in (0, 1, 2)]
    for (alpha, seed), rows in grid.items():
        cfg = load_config(
            [str(REPO / "configs" / f) for f in ("tiny.yaml", "rl-demo.yaml", "think-gpu.yaml", "rl-think-gpu.yaml")],
            [f"seed={seed}", "rl.penalty=kimi", f"rl.alpha={alpha}", f"run_dir=runs/think/rl/a{alpha:g}-s{seed}"],
        )
        ran = load_config(str(GPU / "runs" / f"a{alpha:g}-s{seed}" / "config.yaml"))
        assert ran.deepspeed.grad_accum == cfg.rl.prompts // cfg.rl.groups_per_micro  # set by the run: 4 micro-batches
        ran.deepspeed.grad_accum = cfg.deepspeed.grad_accum
        assert ran == cfg, (alpha, seed)
        assert len(rows) == cfg.steps == 60
        curve = data["curves"][f"{alpha:g}"]["heldout"]
        for r in rows:
            if any(k.startswith("heldout/") for k in r):
                evals = [
                    {k.removeprefix("heldout/"): v for k, v in x.items() if k.startswith("heldout/")}
                    for x in (
                        next(y for y in grid[(alpha, s)] if y["step"] == r["step"])
                        for s in data["curves"][f"{alpha:g}"]["seeds"]
                    )
                ]
                _same(pooled(evals, cfg.rl.eval_items), curve[str(r["step"])])


def _same(got, want, path=""):
    """Equal up to the last rounded digit (the report ran on Python 3.12, whose float sum is compensated)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            _same(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{path}/{i}")
    else:
        places = len(repr(want).partition(".")[2]) if isinstance(want, float) else 0
        assert got == pytest.approx(want, abs=1.0001 * 10**-places), path  # one unit of the last place


def test_the_gpu_study_in_the_docs_is_the_committed_json(tmp_path):
    """docs/RL.md's GPU section: the modes table, the curves and per-task tables, the cut and routing baselines, the
    contemplating comparison and the verdicts are docs/rl/gpu's JSON and metrics."""
    from evals.reasoning import wilson

    text = (REPO / "docs" / "RL.md").read_text()
    flat = " ".join(text.split())
    modes = {t["task"]: t for t in json.loads((GPU / "modes.json").read_text())}
    for task, t in modes.items():
        inst, think = t["modes"]["instant"], t["modes"]["thinking"]
        b = [
            f"{t['baselines'][k]:.3f} [{t['baselines_95'][k][0]:.3f}, {t['baselines_95'][k][1]:.3f}]"
            for k in t["baselines"]
        ]
        line = f"| {task} | {_acc(inst)} | {_acc(think)} | {think['thought_tokens']:.2f} | {' | '.join(b)} |"
        assert line in text or line.removesuffix(" |") + " | |" in text, line
        assert t["items"] == 200
    for task in ("digitsum", "arith"):  # thoughts that help: Thinking's interval above Instant's and the baselines'
        t = modes[task]
        assert t["modes"]["thinking"]["accuracy_95"][0] > t["modes"]["instant"]["accuracy_95"][1]
        assert all(t["modes"]["thinking"]["accuracy_95"][0] > v[1] for v in t["baselines_95"].values())
    ratios = [
        modes[k]["modes"]["thinking"]["accuracy"] / modes[k]["modes"]["instant"]["accuracy"]
        for k in ("digitsum", "arith")
    ]
    assert f"Thinking is {ratios[0]:.1f}x and {ratios[1]:.1f}x Instant there" in flat

    d, a = modes["digitsum"], modes["arith"]
    reasoning = " ".join((REPO / "docs" / "REASONING.md").read_text().split())
    assert (
        f"scores {d['modes']['thinking']['accuracy']:.3f} on digit sums and {a['modes']['thinking']['accuracy']:.3f} "
        f"on arithmetic against Instant's {d['modes']['instant']['accuracy']:.3f} and "
        f"{a['modes']['instant']['accuracy']:.3f} and majority answers of {d['baselines']['majority answer']:.3f} and "
        f"{a['baselines']['majority answer']:.3f}" in reasoning
    )

    data = json.loads((GPU / "curves.json").read_text())
    start = data["start"]
    assert f"| the start (no RL) | 0 | {_acc(start)} | {start['thought_tokens']:.2f} | |" in text
    for alpha, curve in data["curves"].items():
        assert curve["seeds"] == [0, 1, 2]
        for step in ("5", "10", "15", "30", "60"):
            row = curve["heldout"][step]
            seeds = ", ".join(f"{v:.2f}" for v in row["per_seed_accuracy"])
            assert f"| {alpha} | {step} | {_acc(row)} | {row['thought_tokens']:.2f} | {seeds} |" in text
            assert row["items"] == 3 * 200
        assert len(curve["heldout"]) == 12
    assert f"| blind: each task's majority answer | | {_acc(data['blind_majority_answer'])} | | |" in text

    def by_task(x):
        return " | ".join(
            f"{x[t]['accuracy']:.3f}, {x[t]['thought_tokens']:.2f} tokens"
            for t in ("count", "twohop", "digitsum", "arith")
        )

    assert f"| the start | {by_task(start['per_task'])} |" in text
    final = {a: c["heldout"]["60"] for a, c in data["curves"].items()}
    for alpha, row in final.items():
        assert f"| {alpha} | {by_task(row['per_task'])} |" in text
    # the verdicts: thoughts removed on count and twohop, kept whole on digitsum and arith, accuracy the control's
    for alpha in ("0.25", "0.5"):
        pt = final[alpha]["per_task"]
        assert pt["count"]["thought_tokens"] == pt["twohop"]["thought_tokens"] == 0
        for task in ("digitsum", "arith"):
            assert abs(pt[task]["thought_tokens"] - start["per_task"][task]["thought_tokens"]) < 1
    for step in data["curves"]["0"]["heldout"]:
        rows = [c["heldout"][step] for c in data["curves"].values()]
        assert max(r["accuracy_95"][0] for r in rows) < min(r["accuracy_95"][1] for r in rows), step
    accs = ", ".join(f"{final[a]['accuracy']:.3f}" for a in ("0", "0.25"))
    assert f"the three strengths score {accs} and {final['0.5']['accuracy']:.3f}" in flat
    assert all(d["dipped"] and not d["ended_above_start"] for d in data["dip_and_recover"].values())
    assert max(c["heldout"]["10"]["accuracy"] for c in data["curves"].values()) < start["accuracy"]
    assert "**no dip and recovery above the start**" in flat
    for alpha, step in (("0.5", 10), ("0.25", 15)):  # gone in every seed by then
        for seed in (0, 1, 2):
            rows = [
                json.loads(x) for x in (GPU / "runs" / f"a{alpha}-s{seed}" / "metrics.jsonl").read_text().splitlines()
            ]
            r = next(x for x in rows if x["step"] == step)
            assert r["heldout/count/thought_tokens"] == r["heldout/twohop/thought_tokens"] == 0, (alpha, seed)
    assert "At alpha 0.5 the count and two-hop thoughts were gone by step 10 in every seed (at 0.25 by step 15)" in flat

    (mean_cut,) = [c for c in data["cut_baseline"] if c["budget"] == round(final["0.5"]["thought_tokens"])]
    assert f"mean of {mean_cut['budget']} tokens scores {_acc(mean_cut)}" in flat
    per_task = data["cut_baseline_per_task"]
    assert f"{_acc(per_task['0.25'])} at alpha 0.25's lengths and {_acc(per_task['0.5'])} at alpha 0.5's" in flat
    assert all(final[a]["accuracy"] > per_task[a]["accuracy"] > mean_cut["accuracy"] for a in per_task)
    for a, cut in per_task.items():  # route by task: no thought where the cut took it all, the start's chain elsewhere
        tasks = ("count", "twohop", "digitsum", "arith")
        acc = (
            sum(
                cut["per_task_accuracy"][t] if cut["budget"][t] == 0 else start["per_task"][t]["accuracy"]
                for t in tasks
            )
            / 4
        )
        tokens = sum(0 if cut["budget"][t] == 0 else start["per_task"][t]["thought_tokens"] for t in tasks) / 4
        lo, hi = wilson(acc, start["items"])
        assert f"scores {acc:.3f} [{lo:.3f}, {hi:.3f}] at {tokens:.1f} thought tokens" in flat, a
        assert abs(acc - final[a]["accuracy"]) < hi - lo  # as well as the compressed models
    from benchmarks.rl_frontier import plot, route_by_task

    for a in per_task:  # the script the docs cite gives the same routing figures
        r = route_by_task(data, a)
        assert f"scores {r['accuracy']:.3f} [{r['accuracy_95'][0]:.3f}, {r['accuracy_95'][1]:.3f}]" in flat
    plot(data, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (REPO / "docs" / "rl" / "gpu" / "frontier.png").exists() and "](rl/gpu/frontier.png)" in text
    c = data["contemplating_compressed"]
    assert (
        f"{c['chain_thought_tokens']:.2f} thought tokens in all per item, majority vote {_acc(c, 'majority_vote')}, "
        f"the synthesis turn {_acc(c)}" in flat
    )
    assert f"one chain of {start['thought_tokens']:.2f} tokens at {start['accuracy']:.3f}" in flat
    assert c["majority_vote"] < start["accuracy"]

    roll, upd, tps = [], [], []
    for d in sorted((GPU / "runs").iterdir()):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()][1:]
        roll.append(sum(r["rollout_s"] for r in rows) / len(rows))
        upd.append(sum(r["update_s"] for r in rows) / len(rows))
        tps.append(sum(r["rollout_tokens_per_s"] for r in rows) / len(rows))
    assert f"rollouts {min(roll):.2f}-{max(roll):.2f} s and updates {min(upd):.2f}-{max(upd):.2f} s a step" in flat
    assert f"{min(tps):,.0f}-{max(tps):,.0f} a run, {sum(tps):,.0f} summed over the nine" in flat
    for name in ("pretrain", "sft"):
        rows = [json.loads(x) for x in (GPU / f"{name}-metrics.jsonl").read_text().splitlines()]
        median = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
        assert f"at a median {median[len(median) // 2]:,.0f} tokens a second" in flat, name
    sft = [json.loads(x) for x in (GPU / "sft-metrics.jsonl").read_text().splitlines()]
    assert f"text loss {sft[-1]['val/text_loss']:.4f} at the end" in flat


def test_the_correct_only_form_on_the_gpu_is_its_runs():
    """The sigmoid table of docs/RL.md is what rl_report's pooling makes of the six committed runs, which ran with the
    committed configs and rl.penalty=sigmoid; at no step did a useful chain get shorter."""
    from benchmarks.rl_report import pooled, runs

    grid = runs(GPU / "sigmoid")
    assert sorted(grid) == [(a, s) for a in (0.2, 0.5) for s in (0, 1, 2)]
    text = (REPO / "docs" / "RL.md").read_text()
    start = json.loads((GPU / "curves.json").read_text())["start"]["per_task"]
    for (alpha, seed), rows in grid.items():
        ran = load_config(str(GPU / "sigmoid" / f"a{alpha:g}-s{seed}" / "config.yaml"))
        assert (ran.rl.penalty, ran.rl.alpha, ran.seed, ran.steps) == ("sigmoid", alpha, seed, 60)
        for r in rows:
            for task in ("digitsum", "arith"):
                if f"heldout/{task}/thought_tokens" in r:
                    assert abs(r[f"heldout/{task}/thought_tokens"] - start[task]["thought_tokens"]) < 1
    for alpha in (0.2, 0.5):
        for step in (10, 20, 60):
            evals = [
                {
                    k.removeprefix("heldout/"): v
                    for k, v in next(r for r in grid[(alpha, s)] if r["step"] == step).items()
                    if k.startswith("heldout/")
                }
                for s in (0, 1, 2)
            ]
            p = pooled(evals, 50)
            t = p["per_task"]
            line = (
                f"| {alpha:g} | {step} | {_acc(p)} | {p['thought_tokens']:.2f} | "
                f"{t['count']['thought_tokens']:.2f}, {t['twohop']['thought_tokens']:.2f} | "
                f"{t['digitsum']['thought_tokens']:.2f}, {t['arith']['thought_tokens']:.2f} |"
            )
            assert line in text, line
