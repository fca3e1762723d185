"""Thought compression's numbers from `benchmarks/rl.sh`'s runs: curves of held-out accuracy and thought tokens over
RL steps per length-penalty strength (pooled over seeds, Wilson 95% intervals over all items of all seeds), the
starting model's point, the cheap baseline of cutting the starting model's thoughts at the compressed models'
lengths, and Contemplating with N compressed chains against Thinking with the start's one long chain.

    python benchmarks/rl_report.py runs/rl-study --json docs/rl/curves.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch

from data.chat import ChatTokens, parse
from data.images import ImageSpec
from data.tokenizer import Tokenizer
from evals.reasoning import normalise, user_turn, wilson
from infer.engine import Engine, SamplingParams
from infer.modes import contemplate, prompt, stop_ids
from model import load_pretrained
from model.generate import append_text
from train.config import load_config
from train.rl import Prompts, blind_rewards, evaluate, question


def runs(root: Path) -> dict[tuple[float, int], list[dict]]:
    out = {}
    for d in sorted(root.glob("a*-s*")):
        m = re.fullmatch(r"a([\d.]+)-s(\d+)", d.name)
        if m and (d / "metrics.jsonl").exists():
            out[(float(m[1]), int(m[2]))] = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return out


def pooled(evals: list[dict], items: int) -> dict:
    """Accuracy and thought tokens over tasks (equal items each) and seeds: mean, Wilson interval, per seed."""
    per_seed_acc = [sum(v for k, v in e.items() if k.endswith("/accuracy")) / _tasks(e) for e in evals]
    per_seed_tok = [sum(v for k, v in e.items() if k.endswith("/thought_tokens")) / _tasks(e) for e in evals]
    acc = sum(per_seed_acc) / len(evals)
    n = items * _tasks(evals[0]) * len(evals)
    return {
        "accuracy": round(acc, 4),
        "accuracy_95": wilson(acc, n),
        "items": n,
        "thought_tokens": round(sum(per_seed_tok) / len(evals), 2),
        "per_seed_accuracy": [round(a, 4) for a in per_seed_acc],
        "per_seed_thought_tokens": [round(t, 2) for t in per_seed_tok],
        "per_task": {
            k.removesuffix("/accuracy"): {
                "accuracy": round(sum(e[k] for e in evals) / len(evals), 4),
                "thought_tokens": round(
                    sum(e[k.replace("/accuracy", "/thought_tokens")] for e in evals) / len(evals), 2
                ),
            }
            for k in evals[0]
            if k.endswith("/accuracy") and "/baseline/" not in k
        },
    }


def _tasks(e: dict) -> int:
    return sum(1 for k in e if k.endswith("/accuracy"))


def cut_thoughts(model, tok, held_out: Prompts, budget: int | dict[str, int], answer_tokens: int = 16) -> dict:
    """The starting model, greedy, its thought stopped at `budget` tokens (closed there if still open), then its
    answer: what simply cutting costs, without any training. A dict gives each task its own budget (0: the thought
    closed at once), to match a model whose compression differs by task."""
    t = ChatTokens.of(tok)
    spec = ImageSpec(model.cfg.patch_size, model.cfg.max_image_patches)
    engine = Engine(model)
    prompts = [prompt(user_turn(question(p), spec), tok, "thinking", model.cfg) for p in held_out.items]
    limits = [budget[p.task.name] if isinstance(budget, dict) else budget for p in held_out.items]
    thoughts: list[list[int]] = [[] for _ in prompts]
    for b in sorted(set(limits) - {0}):
        at = [i for i, x in enumerate(limits) if x == b]
        for i, x in zip(
            at, engine.generate([prompts[i] for i in at], SamplingParams(b, stop_ids=(t.end_think, t.eos)))
        ):
            thoughts[i] = [j for j in x if j not in (t.end_think, t.eos)]
    closed = [append_text(p, x + [t.end_think, t.answer]) for p, x in zip(prompts, thoughts, strict=True)]
    answers = engine.generate(closed, SamplingParams(answer_tokens, stop_ids=stop_ids(t)))
    right = [p.task.reward(tok.decode(parse(a, "instant", t).answer), p.item) for p, a in zip(held_out.items, answers)]
    n = len(right)
    acc = sum(right) / n
    return {
        "budget": budget,
        "accuracy": round(acc, 4),
        "accuracy_95": wilson(acc, n),
        "thought_tokens": round(sum(map(len, thoughts)) / n, 2),
        "per_task_accuracy": {k: round(v, 4) for k, v in _by_task(held_out, right).items()},
    }


def _by_task(held_out: Prompts, values: list[float]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for p, v in zip(held_out.items, values, strict=True):
        by.setdefault(p.task.name, []).append(v)
    return {k: sum(v) / len(v) for k, v in by.items()}


def contemplating(model, tok, held_out: Prompts, chains: int, max_new_tokens: int) -> dict:
    """N chains forked from one prefill, then the synthesis; accuracy and the chains' tokens per item."""
    t = ChatTokens.of(tok)
    spec = ImageSpec(model.cfg.patch_size, model.cfg.max_image_patches)
    engine = Engine(model)
    right, votes, tokens = [], [], []
    for k, p in enumerate(held_out.items):
        params = SamplingParams(max_new_tokens, 1.0, 1.0, 0, stop_ids(t), k)
        c = contemplate(engine, tok, user_turn(question(p), spec), chains, params)
        (final,) = engine.generate([c.synthesis_prompt], SamplingParams(16, stop_ids=stop_ids(t)))
        right.append(p.task.reward(tok.decode(parse(final, "instant", t).answer), p.item))
        top = Counter(normalise(tok.decode(x.answer)) for x in c.chains).most_common(1)[0][0]
        votes.append(p.task.reward(top, p.item))
        tokens.append(sum(len(x.thought) for x in c.chains))
    acc, vote = sum(right) / len(right), sum(votes) / len(votes)
    return {
        "chains": chains,
        "accuracy": round(acc, 4),
        "accuracy_95": wilson(acc, len(right)),
        "majority_vote": round(vote, 4),
        "majority_vote_95": wilson(vote, len(votes)),
        "chain_thought_tokens": round(sum(tokens) / len(tokens), 2),
    }


def blind(held_out: Prompts) -> dict:
    """Each task's most common held-out answer, given to every item of the task: what no reading gets."""
    by_task: dict[str, list] = {}
    for p in held_out.items:
        by_task.setdefault(p.task.name, []).append(p)
    right = []
    for ps in by_task.values():
        (rewards,) = blind_rewards(ps).values()
        right += rewards
    acc = sum(right) / len(right)
    return {"accuracy": round(acc, 4), "accuracy_95": wilson(acc, len(right)), "items": len(right)}


def final_model(run: Path, start: str):
    """The run's last checkpoint's weights in a model (the torch engine's file: one process)."""
    model = load_pretrained(start)
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))[-1:]
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model.load_state_dict(state)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--json", required=True)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="where the report's generations run (cpu, cuda)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    grid = runs(args.root)
    first = next(iter(grid))
    cfg = load_config(str(args.root / f"a{first[0]:g}-s{first[1]}" / "config.yaml"))
    tok = Tokenizer(cfg.data.tokenizer)
    held_out = Prompts(cfg, "heldout", cfg.rl.eval_items)
    start = load_pretrained(cfg.init_weights).to(args.device).eval()
    start_eval = pooled([evaluate(start, tok, held_out, cfg.rl.max_new_tokens, args.device)], cfg.rl.eval_items)
    curves: dict[str, dict] = {}
    for alpha in sorted({a for a, _ in grid}):
        seeds = sorted(s for a, s in grid if a == alpha)
        steps = sorted({r["step"] for s in seeds for r in grid[(alpha, s)] if any("heldout/" in k for k in r)})
        rows = {}
        for step in steps:
            evals = []
            for s in seeds:
                rec = next((r for r in grid[(alpha, s)] if r["step"] == step), None)
                if rec and any("heldout/" in k for k in rec):
                    evals.append({k.removeprefix("heldout/"): v for k, v in rec.items() if k.startswith("heldout/")})
            if len(evals) == len(seeds):
                rows[step] = pooled(evals, cfg.rl.eval_items)
        by_step: dict[int, list[float]] = {}
        for s in seeds:
            for r in grid[(alpha, s)]:
                by_step.setdefault(r["step"], []).append(r["thought_tokens"])
        train = {k: round(sum(v) / len(v), 2) for k, v in sorted(by_step.items()) if len(v) == len(seeds)}
        curves[f"{alpha:g}"] = {"seeds": seeds, "heldout": rows, "rollout_thought_tokens": train}
    last = {a: c["heldout"][max(c["heldout"])] for a, c in curves.items() if c["heldout"]}
    budgets = sorted({max(1, round(v["thought_tokens"])) for v in last.values()})  # a cut keeps one token at least
    cuts = [cut_thoughts(start, tok, held_out, b) for b in budgets]
    per_task_cuts = {  # each task cut at the compressed models' own length for it (they compress tasks unevenly)
        a: cut_thoughts(start, tok, held_out, {k: round(v["thought_tokens"]) for k, v in row["per_task"].items()})
        for a, row in last.items()
        if a != "0"
    }
    dips = {}
    for a, c in curves.items():
        if a == "0":
            continue
        for i, s in enumerate(c["seeds"]):
            accs = [c["heldout"][k]["per_seed_accuracy"][i] for k in sorted(c["heldout"])]
            low = min(accs)
            dips[f"{a}/seed{s}"] = {
                "accuracies": accs,
                "dipped": low < start_eval["accuracy"],
                "ended_above_start": accs[-1] > start_eval["accuracy"],
            }
    strongest = max(curves, key=float)
    compressed = final_model(args.root / f"a{strongest}-s{curves[strongest]['seeds'][0]}", cfg.init_weights)
    compressed = compressed.to(args.device)
    report = {
        "blind_majority_answer": blind(held_out),
        "start": start_eval,
        "curves": curves,
        "cut_baseline": cuts,
        "cut_baseline_per_task": per_task_cuts,
        "dip_and_recover": dips,
        "contemplating_compressed": {
            "alpha": float(strongest),
            "seed": curves[strongest]["seeds"][0],
            **contemplating(compressed, tok, held_out, args.chains, cfg.rl.max_new_tokens),
        },
        "thinking_start": {"accuracy": start_eval["accuracy"], "thought_tokens": start_eval["thought_tokens"]},
        "config": {"steps": cfg.steps, "lr": cfg.optim.lr, "prompts": cfg.rl.prompts, "group": cfg.rl.group},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    shown = ("blind_majority_answer", "start", "cut_baseline", "cut_baseline_per_task", "contemplating_compressed")
    print(json.dumps({k: report[k] for k in shown}, indent=1))
    for a, c in curves.items():
        for step, row in c["heldout"].items():
            acc, lo_hi, tokens = row["accuracy"], row["accuracy_95"], row["thought_tokens"]
            print(f"alpha {a} step {step}: accuracy {acc:.3f} {lo_hi}, thought tokens {tokens}")


if __name__ == "__main__":
    main()
