"""Run tasks through the batched engine: every item with its image, the same items without it (what the text prior
alone gets), and the task's blind baselines, all scored by the task's own scorer on the same items."""

from __future__ import annotations

import time
from collections import defaultdict

from data.images import ImageSpec, load_image
from data.layout import layout_document
from data.packing import document_batch
from data.tokenizer import Tokenizer
from evals.task import Item, Task
from infer.engine import Engine, SamplingParams
from model.transformer import FusionTransformer


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def complete(engine: Engine, tok: Tokenizer, docs: list[list], max_new_tokens: int, batch_size: int) -> list[str]:
    cfg = engine.model.cfg
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=(tok.special.eos,))
    out: list[str] = []
    for i in range(0, len(docs), batch_size):
        prompts = [
            document_batch(layout_document(d, tok.special, cfg.patch_size, cfg.position_scheme, eos=False))
            for d in docs[i : i + batch_size]
        ]
        out += [tok.decode(t).strip() for t in engine.generate(prompts, params)]
    return out


def evaluate(
    model: FusionTransformer,
    tok: Tokenizer,
    task: Task,
    items: list[Item],
    max_new_tokens: int = 48,
    batch_size: int = 64,
) -> dict:
    t0 = time.perf_counter()
    engine = Engine(model)
    spec = ImageSpec(model.cfg.patch_size, model.cfg.max_image_patches)
    with_image = [[load_image(it.image, spec), tok.encode(it.prompt)] for it in items]
    blind = [[tok.encode(it.prompt)] for it in items]
    outputs = complete(engine, tok, with_image, max_new_tokens, batch_size)
    without = complete(engine, tok, blind, max_new_tokens, batch_size)
    scores = [task.score(o, it) for o, it in zip(outputs, items, strict=True)]
    by_kind: dict[str, list] = defaultdict(list)
    for s, it in zip(scores, items, strict=True):
        if it.kind:
            by_kind[it.kind].append(s)
    baselines = {"model without the image": _mean([task.score(o, it) for o, it in zip(without, items, strict=True)])}
    for name, predictions in task.baselines(items).items():
        baselines[name] = _mean([task.score(p, it) for p, it in zip(predictions, items, strict=True)])
    return {
        "task": task.name,
        "metric": task.metric,
        "items": len(items),
        "model": _mean(scores),
        "by_kind": {k: _mean(v) for k, v in sorted(by_kind.items())},
        "baselines": baselines,
        "examples": [{"output": o, "reference": it.reference} for o, it in list(zip(outputs, items))[:3]],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def table(results: list[dict]) -> str:
    lines = [f"{'task':<12} {'metric':<10} {'items':>5} {'model':>7}  baselines (same items)"]
    for r in results:
        m = r["metric"]
        base = "; ".join(f"{name} {b[m]:.3f}" for name, b in r["baselines"].items())
        lines.append(f"{r['task']:<12} {m:<10} {r['items']:>5} {r['model'][m]:>7.3f}  {base}")
        for kind, s in r["by_kind"].items():
            lines.append(f"{'':<12} {m + '/' + kind:<10} {'':>5} {s[m]:>7.3f}")
    return "\n".join(lines)
