"""The study dataset: procedural multimodal data for scaling studies, as large as asked, with known entropy floors.

    python -m data.study --out artifacts/study [--train 200000] [--val 2000] [--workers 16] [--seed 0]

The embedded dataset repeats within a few epochs at a study's budgets (1.7M unique positions); this one is drawn
sample by sample from the seed and the sample's index, so a build of any size is the same on any machine and with
any number of workers, and no cell of a study need read a sample twice.

  scenes-caption  64x64 scenes on an 8x8 grid: 1-6 objects on distinct cells, 8 colours x 5 shapes x 2 sizes,
                  captioned with every object's attributes and cell, in a random order
  scenes-qa       another scene, a question about it (a count, a colour, a cell's content, a neighbour) and its
                  answer, as an interleaved document
  text            documents of 64 words from a fixed random Markov chain over 1,024 made-up words
Each has train/ and val/; the scenes also have heldout/, whose scenes all contain a colour-shape pair that never
occurs in training. The tokenizer skips NFKC normalisation, so its bytes do not depend on sentencepiece's version.

Entropy floors, computed rather than estimated: a caption given its scene carries exactly ln(n!) nats (the order
in which its n distinct objects are listed is uniform, everything else is a function of the scene); a text document
carries H(pi) + 63 * H(X_t | X_t-1) nats for the chain's stationary distribution pi. Divided by the tokens they
take under the build's tokenizer (the mean over the val split), they give the per-token floor of the caption and
text losses that a fitted E can be compared with (`dataset.json`, `floors`). Answers are functions of their scene:
their floor is 0.
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
WORDS, BRANCHING, DOC_WORDS = 1024, 8, 64
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
class MarkovText:
    """A fixed random first-order chain over made-up words: each word has BRANCHING successors with Dirichlet(1)
    probabilities. Its entropy rate is exact: sum_i pi_i H(P_i)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 99])
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        words: set[str] = set()
        while len(words) < WORDS:
            words.add("".join(rng.choice(syllables, int(rng.integers(1, 4)))))
        self.words = sorted(words)
        self.next = np.stack([rng.choice(WORDS, BRANCHING, replace=False) for _ in range(WORDS)])
        self.prob = rng.dirichlet(np.ones(BRANCHING), WORDS)
        self.cum = np.cumsum(self.prob, axis=1)
        # Power iteration to the stationary distribution over the chain's 8 successors per word, summed in a fixed
        # order (bincount): no BLAS call, so no thread pool per process (16 build workers each starting 16 BLAS
        # threads on 16 cores stalled a build for minutes) and the same bits on any machine.
        pi = np.full(WORDS, 1 / WORDS)
        successors = self.next.ravel()
        for _ in range(100000):
            new = np.bincount(successors, weights=(pi[:, None] * self.prob).ravel(), minlength=WORDS)
            if np.abs(new - pi).max() < 1e-15:
                break
            pi = new
        self.pi = new / new.sum()
        self.cdf = np.cumsum(self.pi)
        self.row_entropy = -(self.prob * np.log(self.prob)).sum(axis=1)

    def document_entropy(self) -> float:
        """Nats per document: the first word from pi, then DOC_WORDS - 1 transitions (the chain stays at pi)."""
        h_pi = float(-(self.pi[self.pi > 0] * np.log(self.pi[self.pi > 0])).sum())
        return h_pi + (DOC_WORDS - 1) * float(self.pi @ self.row_entropy)

    def document(self, rng: np.random.Generator) -> str:
        w = min(int(np.searchsorted(self.cdf, rng.random())), WORDS - 1)
        out = [w]
        for _ in range(DOC_WORDS - 1):
            w = int(self.next[w][min(int(np.searchsorted(self.cum[w], rng.random())), BRANCHING - 1)])
            out.append(w)
        return " ".join(self.words[i] for i in out) + "."


# ------------------------------------------------------------------------------------------------------- build
def sample(source: str, split: str, index: int, seed: int, chain: MarkovText) -> dict:
    """The members of one sample; a function of (seed, source, split, index) alone."""
    rng = np.random.default_rng([seed, SOURCES[source], SPLITS[split], index])
    if source == "text":
        return {"txt": chain.document(rng)}
    objects = sample_scene(rng, split == "heldout")
    if source == "scenes-caption":
        text = caption(objects, rng)
        return {"png": png(render(objects)), "txt": text, "json": {"objects": objects, "caption": text}}
    q, a = question(objects, rng)
    text = f"question: {q} answer: {a}."
    doc = {"segments": [{"image": "0.png"}, {"text": text}], "objects": objects, "question": q, "answer": a}
    return {"0.png": png(render(objects)), "json": doc}


@lru_cache(maxsize=2)
def chain_for(seed: int) -> MarkovText:
    """One chain per seed and process (building it takes a second)."""
    return MarkovText(seed)


def _write_shard(job: tuple) -> dict:
    """One shard: samples [start, stop) into its own part directory, moved into place by the caller."""
    out, source, split, start, stop, seed = job
    part = Path(out) / source / split / f".part-{start:09d}"
    shutil.rmtree(part, ignore_errors=True)
    chain = chain_for(seed)
    with DatasetWriter(part, max_samples=stop - start) as w:
        for i in range(start, stop):
            w.write(f"{i:09d}", sample(source, split, i, seed, chain))
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
) -> dict:
    out = Path(out)
    t0 = time.time()
    chain = chain_for(seed)
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
                s = sample(source, split, i, seed, chain)
                yield s["txt"] if "txt" in s else s["json"]["segments"][1]["text"]

    tok = train_tokenizer(
        texts("train", min(train, tokenizer_samples)), out / "tokenizer.model", vocab_size, normalization="identity"
    )
    captions = [sample("scenes-caption", "val", i, seed, chain) for i in range(min(val, 500))]
    caption_nats = float(np.mean([math.lgamma(len(c["json"]["objects"]) + 1) for c in captions]))
    caption_tokens = tokens_per_sample(tok, [c["txt"] for c in captions])
    text_tokens = tokens_per_sample(tok, [sample("text", "val", i, seed, chain)["txt"] for i in range(len(captions))])
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
                "nats_per_sample": chain.document_entropy(),
                "tokens_per_sample": text_tokens,
                "nats_per_token": chain.document_entropy() / text_tokens,
            },
            "qa_answer": {"nats_per_token": 0.0},
        },
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=1))
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
    args = ap.parse_args(argv)
    info = build(args.out, args.train, args.val, args.seed, args.vocab_size, args.workers, args.shard_samples)
    print(
        f"built {args.out}: {3 * args.train} training samples in {info['build_seconds']} s on {info['workers']} "
        f"worker(s); floors (nats/token): caption {info['floors']['caption']['nats_per_token']:.4f}, "
        f"text {info['floors']['text']['nats_per_token']:.4f}"
    )


if __name__ == "__main__":
    main()
