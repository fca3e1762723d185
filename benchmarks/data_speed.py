"""Loader throughput per worker: tar read + JPEG decode + resize + patchify + tokenize + pack + collate.

    python benchmarks/data_speed.py [--samples 2000] [--seconds 10] [--tokenizer artifacts/data/tokenizer.model]

Builds a caption shard of 256x256 JPEGs cut from scikit-image's real photos (random crops, so no two are the
same), then times one StreamWorker (one dataloader worker's work) for each patch setting and prints images/s
and tokens/s (sequence positions, patches included). Target: 500 images/s per worker.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data.pipeline import DataConfig, SourceConfig, StreamWorker
from data.shards import DatasetWriter
from data.tokenizer import Tokenizer

PHOTOS = [
    "astronaut",
    "cat",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
    "retina",
    "colorwheel",
    "hubble_deep_field",
    "immunohistochemistry",
    "clock",
    "horse",
]


def build_shard(out: Path, n: int, seed: int = 0) -> None:
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    with DatasetWriter(out, max_samples=1000) as w:
        for i in range(n):
            img = photos[i % len(photos)]
            side = int(rng.integers(min(img.size) // 2, min(img.size) + 1))
            x, y = int(rng.integers(0, img.width - side + 1)), int(rng.integers(0, img.height - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((256, 256), Image.BICUBIC)
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            caption = f"a photo, crop {i} of {PHOTOS[i % len(PHOTOS)]}, {side} pixels wide, seen at noon."
            w.write(f"{i:06d}", {"jpg": buf.getvalue(), "txt": caption})


def measure(shards: Path, tokenizer: str, patch: int, budget: int, seconds: float) -> dict:
    cfg = DataConfig(
        sources=[SourceConfig("photos", str(shards))],
        tokenizer=tokenizer,
        seq_len=2048,
        batch_size=8,
        workers=0,
        patch_size=patch,
        max_image_patches=budget,
    )
    worker = StreamWorker(cfg, Tokenizer(tokenizer), 0, 1, None)
    batches = worker.batches(0)
    next(batches)  # load the shard, warm caches
    start_images = worker.counts["kind/caption"]
    positions, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = next(batches)
        positions += int(batch["tokens"].numel())
    dt = time.perf_counter() - t0
    images = worker.counts["kind/caption"] - start_images
    return {
        "patch_size": patch,
        "max_patches": budget,
        "images_per_s": round(images / dt, 1),
        "tokens_per_s": round(positions / dt),
        "patches_per_image": min(budget, (256 // patch) ** 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--tokenizer", default="artifacts/data/tokenizer.model")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        build_shard(Path(tmp) / "photos", args.samples)
        results = [
            measure(Path(tmp) / "photos", args.tokenizer, p, b, args.seconds)
            for p, b in ((16, 256), (8, 256), (8, 1024))
        ]
    print(f"{'patch':>5} {'budget':>6} {'patches/img':>11} {'images/s':>9} {'tokens/s':>9}")
    for r in results:
        print(
            f"{r['patch_size']:>5} {r['max_patches']:>6} {r['patches_per_image']:>11} {r['images_per_s']:>9} "
            f"{r['tokens_per_s']:>9}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
