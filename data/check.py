"""Stream shards once and report what a training run would see, before spending GPU hours on them.

    python -m data.check SHARDS... [--tokenizer tok.model] [--patch-size 8] [--max-image-patches 256] [--limit N]
    python -m data.check SHARDS... --config configs/tiny.yaml   # the limits a training run will apply

SHARDS are shard files, brace patterns, globs or dataset directories. Prints the good samples, samples by kind,
skips by reason, shards that could not be read, the token and patch distributions per document, and images/s.
Exits 1 when a path does not exist or no good sample was read: a data problem stops a job script here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from data.images import ImageSpec
from data.layout import layout_document
from data.pipeline import read_shard
from data.samples import Skip, to_segments
from data.shards import resolve_shards


def check(
    shards: list[str],
    tokenizer: str | None,
    spec: ImageSpec,
    limit: int | None = None,
    seq_len: int | None = None,
    scheme: str = "mrope",
) -> dict:
    """seq_len (with a tokenizer): also lay each document out as training does and count those longer than a row,
    which packing cuts across rows (`cut/longer_than_seq_len`)."""
    encode = len  # without a tokenizer, report characters
    special = tok = None
    if tokenizer:
        from data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
        encode, special = tok.encode, tok.special
    counts: Counter = Counter()
    tokens, patches = [], []
    image_seconds, images = 0.0, 0
    paths = resolve_shards(shards)
    for path in paths:
        for sample in read_shard(path, counts):
            if limit and counts["samples"] >= limit:
                break
            counts["samples"] += 1
            t0 = time.perf_counter()
            try:
                kind, segments = to_segments(sample, encode, spec, tok=tok)
            except Skip as e:
                counts[f"skip/{e.reason}"] += 1
                continue
            n_img = sum(isinstance(s, np.ndarray) for s in segments)
            if n_img:
                image_seconds += time.perf_counter() - t0
                images += n_img
            counts[f"kind/{kind}"] += 1
            if (
                seq_len
                and special is not None
                and len(layout_document(segments, special, spec.patch_size, scheme)) > seq_len
            ):
                counts["cut/longer_than_seq_len"] += 1
            tokens.append(sum(s if isinstance(s, int) else len(s) for s in segments if not isinstance(s, np.ndarray)))
            patches.append(
                sum(s.shape[1] * s.shape[2] // spec.patch_size**2 for s in segments if isinstance(s, np.ndarray))
            )
    pct = lambda xs: {f"p{q}": float(np.percentile(xs, q)) for q in (0, 50, 90, 99, 100)} if xs else {}  # noqa: E731
    skipped = sum(v for k, v in counts.items() if k.startswith("skip/"))
    return {
        "shards": len(paths),
        "missing": [p for p in paths if not Path(p).exists()],
        "good_samples": counts["samples"] - skipped,
        "counts": dict(sorted(counts.items())),
        "skip_rate": skipped / max(1, counts["samples"]),
        ("tokens" if tokenizer else "characters") + "_per_doc": pct(tokens),
        "patches_per_doc": pct(patches),
        "total_tokens" if tokenizer else "total_characters": int(sum(tokens)),
        "total_patches": int(sum(patches)),
        "images_per_s": round(images / image_seconds, 1) if image_seconds else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="+")
    ap.add_argument("--tokenizer")
    ap.add_argument("--config", help="a training config: check against its tokenizer, patch size, image and row limits")
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--max-image-patches", type=int, default=256)
    ap.add_argument("--max-image-pixels", type=int, default=64_000_000)
    ap.add_argument("--limit", type=int, help="stop after this many samples")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    spec = ImageSpec(args.patch_size, args.max_image_patches, args.max_image_pixels)
    seq_len, scheme, tokenizer = None, "mrope", args.tokenizer
    if args.config:  # the limits a training run will apply: its tokenizer, patches, image size, row length
        from train.config import load_config

        data = load_config(args.config).data
        spec, seq_len, scheme, tokenizer = data.image_spec, data.seq_len, data.position_scheme, data.tokenizer
    report = check(args.shards, tokenizer, spec, args.limit, seq_len, scheme)
    if args.json:
        print(json.dumps(report))
    else:
        show(report)
    if report["missing"] or not report["good_samples"]:
        problem = f"missing: {', '.join(report['missing'])}" if report["missing"] else "no good sample was read"
        raise SystemExit(f"error: {problem}")
    return report


def show(report: dict) -> None:
    print(
        f"shards: {report['shards']}   samples: {report['counts'].get('samples', 0)}   "
        f"good: {report['good_samples']}   "
        f"skip rate: {report['skip_rate']:.2%}   images/s (decode+resize): {report['images_per_s']}"
    )
    for key, value in report["counts"].items():
        if key != "samples":
            print(f"  {key:<28} {value}")
    for key in [k for k in report if k.endswith("_per_doc")]:
        print(f"  {key:<28} " + "  ".join(f"{q}={v:g}" for q, v in report[key].items()))


if __name__ == "__main__":
    main()
