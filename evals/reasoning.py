"""The reasoning tasks (data.reasoning) as evaluation tasks, asked in each reasoning mode through the chat template.

Per mode: accuracy (the exact answer, with its 95% Wilson interval over the items), mean thought and answer tokens;
Contemplating adds majority vote over the same N chains and pass@N (any chain right), which is what its synthesis
is to be compared with. Next to them, on
the same items: the task's majority answer (a blind guess) and the model in Instant mode without the image (what
the question alone gets). The score is the task's, so RL can use it as the reward (`Task.reward`).

    python -m evals DIR --tasks count,twohop,digitsum,arith --data artifacts/reasoning --modes instant,thinking
"""

from __future__ import annotations

import json
import time
from collections import Counter

from data.chat import ChatTokens, parse
from data.images import ImageSpec, load_image
from evals.task import Item, Task
from infer.engine import Engine, SamplingParams
from infer.modes import contemplate, prompt, stop_ids


def normalise(answer: str) -> str:
    return answer.strip().rstrip(".").strip().lower()


class ReasoningTask(Task):
    metric = "exact"

    def __init__(self, name: str):
        self.name, self.source = name, f"{name}/heldout"

    def item(self, sample: dict) -> Item:
        meta = json.loads(sample["json"])
        question = next(p["text"] for p in meta["messages"][0]["content"] if "text" in p)
        return Item(image=sample.get("0.png"), prompt=question, reference=meta["answer"], kind=self.name)

    def score(self, output: str, item: Item) -> dict[str, float]:
        return {"exact": float(normalise(output) == normalise(item.reference))}

    def baselines(self, items: list[Item]) -> dict[str, list[str]]:
        top = Counter(it.reference for it in items).most_common(1)[0][0]
        return {"majority answer": [top] * len(items)}


def user_turn(item: Item, spec: ImageSpec, image: bool = True) -> list[dict]:
    """The item as a conversation to answer: its image (unless image=False) and its question."""
    content = ([load_image(item.image, spec)] if item.image and image else []) + [item.prompt]
    return [{"role": "user", "content": content}]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def wilson(share: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of an accuracy over n items (sound at 0 and 1, unlike the normal one)."""
    if n == 0:
        return [float("nan"), float("nan")]
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((share * (1 - share) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def evaluate_modes(
    model,
    tok,
    task: ReasoningTask,
    items: list[Item],
    modes=("instant", "thinking"),
    chains: int = 4,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    t0 = time.perf_counter()
    engine, t, cfg = Engine(model), ChatTokens.of(tok), model.cfg
    spec = ImageSpec(cfg.patch_size, cfg.max_image_patches)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=stop_ids(t))

    def ask(prompts: list[dict], mode: str):
        ids = []
        for i in range(0, len(prompts), batch_size):
            ids += engine.generate(prompts[i : i + batch_size], greedy)
        return [parse(x, mode, t) for x in ids]

    def right(answer_ids, item) -> float:
        return task.score(tok.decode(answer_ids), item)["exact"]

    results: dict[str, dict] = {}
    for mode in modes:
        t_mode = time.perf_counter()
        if mode == "contemplating":
            rows = []
            for k, it in enumerate(items):
                params = SamplingParams(max_new_tokens, 1.0, 1.0, 0, stop_ids(t), seed + k)
                rows.append(contemplate(engine, tok, user_turn(it, spec), chains, params))
            final = ask([r.synthesis_prompt for r in rows], "instant")
            votes = [Counter(normalise(tok.decode(c.answer)) for c in r.chains).most_common(1)[0][0] for r in rows]
            results[mode] = {
                "accuracy": _mean(right(f.answer, it) for f, it in zip(final, items, strict=True)),
                "majority_vote": _mean(task.score(v, it)["exact"] for v, it in zip(votes, items, strict=True)),
                f"pass@{chains}": _mean(
                    max(right(c.answer, it) for c in r.chains) for r, it in zip(rows, items, strict=True)
                ),
                "thought_tokens": _mean(sum(len(c.thought) for c in r.chains) for r in rows),
                "answer_tokens": _mean(len(f.answer) for f in final),
                "chains": chains,
            }
        else:
            replies = ask([prompt(user_turn(it, spec), tok, mode, cfg) for it in items], mode)
            results[mode] = {
                "accuracy": _mean(right(r.answer, it) for r, it in zip(replies, items, strict=True)),
                "thought_tokens": _mean(len(r.thought) for r in replies),
                "answer_tokens": _mean(len(r.answer) for r in replies),
                "closed": _mean(float(r.finished) for r in replies),  # answers that ended, not cut by the limit
            }
        for key in [k for k in results[mode] if k in ("accuracy", "majority_vote") or k.startswith("pass@")]:
            results[mode][f"{key}_95"] = wilson(results[mode][key], len(items))
        results[mode]["seconds"] = round(time.perf_counter() - t_mode, 2)
    baselines = {
        name: _mean(task.score(p, it)["exact"] for p, it in zip(preds, items, strict=True))
        for name, preds in task.baselines(items).items()
    }
    if any(it.image for it in items):
        blind = ask([prompt(user_turn(it, spec, image=False), tok, "instant", cfg) for it in items], "instant")
        baselines["instant without the image"] = _mean(right(r.answer, it) for r, it in zip(blind, items, strict=True))
    return {
        "task": task.name,
        "items": len(items),
        "modes": results,
        "baselines": baselines,
        "baselines_95": {k: wilson(v, len(items)) for k, v in baselines.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def modes_markdown(results: list[dict]) -> str:
    """The scores as a markdown table: what `python -m evals` prints and docs/REASONING.md quotes (checked against
    the JSON by tests/test_reasoning.py)."""
    lines = [
        "| task | mode | accuracy [95%] | thought tokens | answer tokens | majority vote | pass@N |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for mode, m in r["modes"].items():
            lo, hi = m["accuracy_95"]
            vote = f"{m['majority_vote']:.3f}" if "majority_vote" in m else ""
            at = next(
                (f"{m[k]:.3f} (N={m['chains']})" for k in m if k.startswith("pass@") and not k.endswith("_95")), ""
            )
            lines.append(
                f"| {r['task']} | {mode} | {m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {m['thought_tokens']:.1f} | "
                f"{m['answer_tokens']:.1f} | {vote} | {at} |"
            )
        for name, value in r["baselines"].items():
            lo, hi = r["baselines_95"][name]
            lines.append(f"| {r['task']} | baseline: {name} | {value:.3f} [{lo:.3f}, {hi:.3f}] | | | | |")
    return "\n".join(lines)
