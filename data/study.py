"""The study dataset: procedural multimodal data for scaling studies, as large as asked, with known entropy floors.

    python -m data.study --out artifacts/study [--prepared artifacts/study-prepared] [--train 200000] [--val 2000]
                         [--workers 16] [--seed 0]

The embedded dataset repeats within a few epochs at a study's budgets (1.7M unique positions); this one is drawn
sample by sample from the seed and the sample's index, so a build of any size is the same on any machine and with
any number of workers, and no cell of a study need read a sample twice.

  scenes-caption  64x64 scenes on an 8x8 grid: 1-6 objects on distinct cells, 8 colours x 5 shapes x 2 sizes,
                  captioned with every object's attributes and cell, in a random order
  scenes-qa       another scene, a question about it (a count, a colour, a cell's content, a neighbour) and its
                  answer, as an interleaved document
  text            documents of 24 facts ("zabeko lives in mifa.") about 262,144 made-up names drawn from a Zipf
                  law, from a fixed random table of 4 relations x 256 values (`FactText`)
Each has train/ and val/; the scenes also have heldout/, whose scenes all contain a colour-shape pair that never
occurs in training. The tokenizer skips NFKC normalisation, so its bytes do not depend on sentencepiece's version.

Entropy floors, computed rather than estimated: a caption given its scene carries exactly ln(n!) nats (the order
in which its n distinct objects are listed is uniform, everything else is a function of the scene); a text document
carries 24 x (H(Zipf) + ln 4) nats (which names and relations; the values follow from the table). Divided by the
tokens they take under the build's tokenizer (the mean over the val split), they give the per-token floor of the
caption and text losses that a fitted E can be compared with (`dataset.json`, `floors`). Answers are functions of
their scene: their floor is 0.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.embedded import png
from data.images import ImageSpec
from data.prepared import prepare
from data.shards import DatasetWriter, write_manifest
from data.tokenizer import Tokenizer, train_tokenizer

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "cyan": (40, 190, 200),
    "gray": (120, 120, 120),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 2, "large": 3}  # half-extent in pixels inside an 8x8 cell
HELD_OUT = {("green", "diamond"), ("blue", "cross"), ("orange", "triangle"), ("purple", "square")}
GRID, CELL = 8, 8
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
MAX_OBJECTS = 6
ENTITIES, ZIPF, VALUES, DOC_FACTS = 262_144, 1.1, 256, 24
RELATIONS = ("lives in", "likes", "works with", "fears")
SOURCES = {"scenes-caption": 0, "scenes-qa": 1, "text": 2}
SPLITS = {"train": 0, "val": 1, "heldout": 2}


# ------------------------------------------------------------------------------------------------------ scenes
def sample_scene(rng: np.random.Generator, held_out: bool) -> list[dict]:
    """1-6 objects on distinct cells. held_out=True: at least one object is a held-out pair; False: none is."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    allowed = [p for p in pairs if p not in HELD_OUT]
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, n, replace=False)
    chosen = [allowed[int(rng.integers(len(allowed)))] for _ in range(n)]
    if held_out:
        chosen[int(rng.integers(n))] = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
    return [
        {"color": c, "shape": s, "size": str(rng.choice(list(SIZES))), "row": int(k) // GRID, "col": int(k) % GRID}
        for (c, s), k in zip(chosen, cells)
    ]


def render(objects: list[dict]) -> Image.Image:
    img = Image.new("RGB", (GRID * CELL, GRID * CELL), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r = o["col"] * CELL + CELL // 2, o["row"] * CELL + CELL // 2, SIZES[o["size"]]
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:
            draw.rectangle((cx - r, cy - 1, cx + r, cy), fill=fill)
            draw.rectangle((cx - 1, cy - r, cx, cy + r), fill=fill)
    return img


def name(o: dict) -> str:
    return f"{o['size']} {o['color']} {o['shape']}"


def caption(objects: list[dict], rng: np.random.Generator) -> str:
    """Every object with its cell, in a uniformly random order: ln(n!) nats beyond what the scene fixes."""
    order = rng.permutation(len(objects))
    return "; ".join(f"a {name(objects[i])} at row {objects[i]['row']} column {objects[i]['col']}" for i in order) + "."


def question(objects: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    """A count, a colour, what a cell holds, or what is next to an object; the answer follows from the scene."""
    at = {(o["row"], o["col"]): o for o in objects}
    o = objects[int(rng.integers(len(objects)))]
    kind = str(rng.choice(["count", "count-color", "color", "cell", "right", "below"]))
    if kind == "count":
        return "how many shapes are there?", NUMBERS[len(objects)]
    if kind == "count-color":
        color = str(rng.choice(list(COLORS)))
        return f"how many {color} shapes are there?", NUMBERS[sum(x["color"] == color for x in objects)]
    if kind == "color":
        return f"what color is the shape at row {o['row']} column {o['col']}?", o["color"]
    if kind == "cell":
        r, c = int(rng.integers(GRID)), int(rng.integers(GRID))
        x = at.get((r, c))
        return f"what is at row {r} column {c}?", f"a {name(x)}" if x else "nothing"
    dr, dc = (0, 1) if kind == "right" else (1, 0)
    x = at.get((o["row"] + dr, o["col"] + dc))
    phrase = "right of" if kind == "right" else "below"
    return f"what is directly {phrase} the {name(o)} at row {o['row']} column {o['col']}?", (
        f"a {name(x)}" if x else "nothing"
    )


# -------------------------------------------------------------------------------------------------------- text
class FactText:
    """Documents of facts about made-up people: a fixed random table gives each of ENTITIES names one value per
    relation ("zabeko lives in mifa."); a document states DOC_FACTS facts, each about a name drawn from a Zipf law
    (exponent ZIPF) and a relation drawn uniformly.

    Why facts: the first study's Markov chain (1,024 words, 8 successors each) was learnt to its floor by its
    smallest model within a few hundred steps, so its loss carried no scaling signal. Recalling 262,144 facts
    takes memory that grows with the model (a small model holds the frequent names, a larger one the tail) and
    data that grows with the names' rarity: loss keeps falling in both N and D, as in Hutter's (2021) and Michaud
    et al.'s (2023) Zipf-distributed models of power-law learning curves. The floor is exact: given the table, a
    fact carries the name's and the relation's entropy and nothing else (names and values are single words, so a
    document parses back into its facts)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 99])
        syl = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        s = len(syl)
        ids = rng.choice(s**3, ENTITIES, replace=False).tolist()  # names: three syllables, all distinct
        self.names = [syl[i // s**2] + syl[i // s % s] + syl[i % s] for i in ids]
        ids = rng.choice(s**2, len(RELATIONS) * VALUES, replace=False).tolist()  # values: two syllables, distinct
        self.values = [
            [syl[i // s] + syl[i % s] for i in ids[r * VALUES : (r + 1) * VALUES]] for r in range(len(RELATIONS))
        ]
        self.table = rng.integers(VALUES, size=(ENTITIES, len(RELATIONS)))
        weights = np.arange(1, ENTITIES + 1, dtype=np.float64) ** -ZIPF
        self.prob = weights / weights.sum()
        self.cdf = np.cumsum(self.prob)

    def fact_entropy(self) -> float:
        """Nats per fact: the name's Zipf entropy plus ln(number of relations)."""
        return float(-(self.prob * np.log(self.prob)).sum()) + math.log(len(RELATIONS))

    def document_entropy(self) -> float:
        return DOC_FACTS * self.fact_entropy()

    def document(self, rng: np.random.Generator) -> str:
        who = np.minimum(np.searchsorted(self.cdf, rng.random(DOC_FACTS)), ENTITIES - 1)
        rel = rng.integers(len(RELATIONS), size=DOC_FACTS)
        return " ".join(
            f"{self.names[e]} {RELATIONS[r]} {self.values[r][self.table[e, r]]}."
            for e, r in zip(who.tolist(), rel.tolist())
        )


# ------------------------------------------------------------------------------------------------------- build
def sample(source: str, split: str, index: int, seed: int, facts: FactText) -> dict:
    """The members of one sample; a function of (seed, source, split, index) alone."""
    rng = np.random.default_rng([seed, SOURCES[source], SPLITS[split], index])
    if source == "text":
        return {"txt": facts.document(rng)}
    objects = sample_scene(rng, split == "heldout")
    if source == "scenes-caption":
        text = caption(objects, rng)
        return {"png": png(render(objects)), "txt": text, "json": {"objects": objects, "caption": text}}
    q, a = question(objects, rng)
    text = f"question: {q} answer: {a}."
    doc = {"segments": [{"image": "0.png"}, {"text": text}], "objects": objects, "question": q, "answer": a}
    return {"0.png": png(render(objects)), "json": doc}


@lru_cache(maxsize=2)
def facts_for(seed: int) -> FactText:
    """One table per seed and process (building it takes a second)."""
    return FactText(seed)


def _write_shard(job: tuple) -> dict:
    """One shard: samples [start, stop) into its own part directory, moved into place by the caller."""
    out, source, split, start, stop, seed = job
    part = Path(out) / source / split / f".part-{start:09d}"
    shutil.rmtree(part, ignore_errors=True)
    facts = facts_for(seed)
    with DatasetWriter(part, max_samples=stop - start) as w:
        for i in range(start, stop):
            w.write(f"{i:09d}", sample(source, split, i, seed, facts))
    return {"part": str(part), "start": start}


def _write_split(out: Path, source: str, split: str, n: int, seed: int, shard_samples: int, run) -> dict:
    target = out / source / split
    target.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), source, split, s, min(n, s + shard_samples), seed) for s in range(0, n, shard_samples)]
    shards = []
    for k, done in enumerate(run(_write_shard, jobs)):
        part = Path(done["part"])
        name = f"shard-{k:05d}.tar"
        (part / "shard-00000.tar").replace(target / name)
        info = json.loads((part / "manifest.json").read_text())["shards"][0]
        shards.append({**info, "path": name})
        shutil.rmtree(part)
    return write_manifest(target, shards)


def tokens_per_sample(tok: Tokenizer, texts: list[str]) -> float:
    return float(np.mean([len(tok.encode(t)) for t in texts]))


def build(
    out: str | Path,
    train: int = 200_000,
    val: int = 2000,
    seed: int = 0,
    vocab_size: int = 4096,
    workers: int = 0,
    shard_samples: int = 5000,
    tokenizer_samples: int = 20_000,
    prepared: str | Path | None = None,
) -> dict:
    out = Path(out)
    t0 = time.time()
    facts = facts_for(seed)
    workers = workers or os.cpu_count() or 1
    # spawn, not fork: a process that has imported torch (a test, a notebook) does not fork safely. One BLAS/OpenMP
    # thread per worker, the workers being the parallelism: set while the pool lives (it starts its processes on
    # demand, and they inherit the environment as it is then)
    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in threads})
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
        with pool or nullcontext():
            for source in SOURCES:
                for split, n in (("train", train), ("val", val), ("heldout", val)):
                    if split == "heldout" and source == "text":
                        continue
                    _write_split(out, source, split, n, seed, shard_samples, pool.map if pool else map)
    finally:
        for k, v in threads.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    build_s = time.time() - t0

    def texts(split: str, n: int):
        for i in range(n):
            for source in SOURCES:
                s = sample(source, split, i, seed, facts)
                yield s["txt"] if "txt" in s else s["json"]["segments"][1]["text"]

    tok = train_tokenizer(
        texts("train", min(train, tokenizer_samples)), out / "tokenizer.model", vocab_size, normalization="identity"
    )
    captions = [sample("scenes-caption", "val", i, seed, facts) for i in range(min(val, 500))]
    caption_nats = float(np.mean([math.lgamma(len(c["json"]["objects"]) + 1) for c in captions]))
    caption_tokens = tokens_per_sample(tok, [c["txt"] for c in captions])
    text_tokens = tokens_per_sample(tok, [sample("text", "val", i, seed, facts)["txt"] for i in range(len(captions))])
    info = {
        "seed": seed,
        "train_samples_per_source": train,
        "val_samples_per_source": val,
        "vocab_size": tok.vocab_size,
        "workers": workers,
        "build_seconds": round(build_s, 1),
        "samples_per_second": round(3 * train / build_s) if build_s else None,
        "held_out_pairs": sorted(HELD_OUT),
        "floors": {
            "caption": {
                "nats_per_sample": caption_nats,
                "tokens_per_sample": caption_tokens,
                "nats_per_token": caption_nats / caption_tokens,
            },
            "text": {
                "nats_per_sample": facts.document_entropy(),
                "tokens_per_sample": text_tokens,
                "nats_per_token": facts.document_entropy() / text_tokens,
            },
            "qa_answer": {"nats_per_token": 0.0},
        },
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=1))
    if prepared is not None:
        # The study family's image budget (patches of 8, one per grid cell): a loader worker then only reads and
        # packs, which tripled its tokens/s on these short documents (a cell's step waited on its loader)
        t1 = time.time()
        prepare(out, Path(prepared), str(out / "tokenizer.model"), ImageSpec(CELL, GRID * GRID), workers)
        info["prepare_seconds"] = round(time.time() - t1, 1)
        (Path(prepared) / "dataset.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/study")
    ap.add_argument("--train", type=int, default=200_000, help="training samples per source")
    ap.add_argument("--val", type=int, default=2000, help="validation (and held-out) samples per source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=0, help="processes (default: every core)")
    ap.add_argument("--shard-samples", type=int, default=5000)
    ap.add_argument("--prepared", help="also write prepared shards (data.prepared, patches of 8) to this directory")
    args = ap.parse_args(argv)
    info = build(
        args.out,
        args.train,
        args.val,
        args.seed,
        args.vocab_size,
        args.workers,
        args.shard_samples,
        prepared=args.prepared,
    )
    print(
        f"built {args.out}: {3 * args.train} training samples in {info['build_seconds']} s on {info['workers']} "
        f"worker(s); floors (nats/token): caption {info['floors']['caption']['nats_per_token']:.4f}, "
        f"text {info['floors']['text']['nats_per_token']:.4f}"
        + (f"; prepared {args.prepared} in {info['prepare_seconds']} s" if args.prepared else "")
    )


if __name__ == "__main__":
    main()
