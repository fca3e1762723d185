"""Loader throughput per worker: tar read + JPEG decode + resize + patchify + tokenize + pack + collate.

    python benchmarks/data_speed.py [--samples 2000] [--seconds 10] [--tokenizer artifacts/data/tokenizer.model]
    python benchmarks/data_speed.py --handoff artifacts/data

Builds a caption shard of 256x256 JPEGs cut from scikit-image's real photos (random crops, so no two are the
same), then times one StreamWorker (one dataloader worker's work) for each patch setting and prints images/s
and tokens/s (sequence positions, patches included). Target: 500 images/s per worker.

--scaling DIR measures what the host can feed: packed rows/s of the real StreamingLoader over the embedded
mixture in DIR, raw or prepared (`python -m data.prepared`), in batches of 32 rows of 2048, for each worker count
in --workers, the trainer side only taking batches (no GPU); 0 workers is one StreamWorker in this process. DIR a
study build (`python -m data.study`, raw or --prepared): its mixture as configs/study.yaml reads it, 64 rows of 512.
With --store ROWS the loader gathers the same mixture's rows from a row store made by `python -m data.rows`.

--independent DIR runs, for each count in --workers, that many separate processes each making batches on its own
stream (a StreamWorker, no DataLoader, nothing handed anywhere) and sums their rows/s: what the host's cores give
when nothing is shared. Beside --scaling it tells a loader held back by its handoff from a host out of cores.
--spin does the same with a pure-Python arithmetic loop (loops of 10,000 a second), the control: cores that scale
on work with no memory traffic.

--layout DIR times one piece of a worker's work on a study build: a document's layout from its shape's cached
skeleton (what the loader does) against laying it out whole.

--handoff DIR times the other side: the trainer process's CPU time per batch it takes from two workers (32 rows of
2048 from the embedded mixture in DIR, or 64 of 512 from a study build), with torch's two ways of sharing tensors
between processes. That time is taken from the process that launches the GPU work.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def handoff(data_dir: str, strategy: str, batches: int = 200) -> dict:
    """The trainer process's CPU time per batch taken from two workers (all its threads: the receiving, and on a GPU
    machine the pinning), and the wall time, over `batches` batches after 20 to warm up."""
    from data.pipeline import StreamingLoader

    loader = StreamingLoader(_mixture(data_dir, 2), sharing=strategy)
    for _ in range(20):
        next(loader)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(loader)
    return {
        "strategy": strategy,
        "wall_ms_per_batch": round(1000 * (time.perf_counter() - wall) / batches, 2),
        "cpu_ms_per_batch": round(1000 * (time.process_time() - cpu) / batches, 2),
    }


def _alone(args: tuple) -> dict:
    """One process's rows/s, making batches on stream `i` of `n` for `seconds` after its first batch, and the CPU
    time a row took it (user and system: a process that gets its core but slows has more of both a row; one that
    waits for a core, or for a lock it sleeps on, does not)."""
    import resource

    data_dir, i, n, seconds = args
    cfg = _mixture(data_dir, 0)
    batches = StreamWorker(cfg, Tokenizer(cfg.tokenizer), i, n, None).batches(0)
    next(batches)
    rows, t0, r0 = 0, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    while time.perf_counter() - t0 < seconds:
        rows += len(next(batches)["tokens"])
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rows_per_s": rows / dt,
        "user_ms_per_row": 1000 * (r1.ru_utime - r0.ru_utime) / rows,
        "sys_ms_per_row": 1000 * (r1.ru_stime - r0.ru_stime) / rows,
        "minor_faults_per_row": (r1.ru_minflt - r0.ru_minflt) / rows,
    }


def _spin(seconds: float) -> float:
    """Loops a second of a Python loop that touches no memory beyond a few integers."""
    t0, loops, n = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        for i in range(10000):
            n += i * i
        loops += 1
    return loops / (time.perf_counter() - t0)


def spin(n: int, seconds: float) -> dict:
    """The same loop in `n` processes at once, summed: how the host's cores scale on work with no memory traffic,
    the control for --independent."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(n) as pool:
        each = pool.map(_spin, [seconds] * n)
    return {"processes": n, "loops_per_s": round(sum(each), 1), "per_process": round(sum(each) / n, 1)}


def independent(data_dir: str, n: int, seconds: float) -> dict:
    """Rows/s of `n` StreamWorkers in `n` processes of their own, summed; the CPU time a row, averaged."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(n) as pool:
        each = pool.map(_alone, [(data_dir, i, n, seconds) for i in range(n)])
    total = sum(e["rows_per_s"] for e in each)
    out = {"processes": n, "rows_per_s": round(total, 1), "per_process": round(total / n, 1)}
    for k in ("user_ms_per_row", "sys_ms_per_row", "minor_faults_per_row"):
        out[k] = round(sum(e[k] for e in each) / n, 4)
    return out


def _mixture(data_dir: str, workers: int) -> DataConfig:
    if not (Path(data_dir) / "digits").is_dir():  # no MNIST digits: a study build, not the embedded one
        return _study_mixture(data_dir, workers)
    mix = (("scenes-caption", 0.45), ("scenes-qa", 0.45), ("text", 0.10))
    return DataConfig(
        sources=[SourceConfig(name, f"{data_dir}/{name}/train", w) for name, w in mix],
        tokenizer=f"{data_dir}/tokenizer.model",
        seq_len=2048,
        batch_size=32,
        workers=workers,
        patch_size=16,
    )


def _study_mixture(data_dir: str, workers: int) -> DataConfig:
    """A study build (`python -m data.study`, raw or --prepared) read as configs/study.yaml reads it: that config's
    data section with its sources moved under DIR."""
    from train.config import load_config

    data = load_config("configs/study.yaml", [f"data.tokenizer={data_dir}/tokenizer.model"]).data
    root = Path(data.sources[0].shards).parents[1]  # artifacts/study-prepared
    sources = [
        dataclasses.replace(s, shards=str(Path(data_dir) / Path(s.shards).relative_to(root))) for s in data.sources
    ]
    return dataclasses.replace(data, sources=sources, workers=workers)


def scaling(data_dir: str, workers: int, seconds: float, store: str | None = None) -> dict:
    """Packed rows/s the loader delivers with `workers` processes (after each has made its first batch); with a
    row store (`python -m data.rows`, made from the same mixture) the rows are gathered from it instead."""
    from data.rows import open_loader

    cfg = dataclasses.replace(_mixture(data_dir, workers), rows=store or "")
    loader = open_loader(cfg)
    for _ in range(max(1, workers)):
        next(loader)
    left = loader.capacity() - max(1, workers) if store else float("inf")  # a store's rows end: stop before
    batches, rows, pieces, piece_rows, nbytes = 0, 0, 0, 0, 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds and batches < left:
        batch = next(loader)
        batches += 1
        rows += len(batch["tokens"])
        if batches <= 20:  # documents a row from the first batches: a store builds the pieces' keys on request
            pieces, piece_rows = pieces + sum(len(row) for row in loader.last_pieces), piece_rows + len(batch["tokens"])
        nbytes += sum(t.nbytes for t in batch.values())
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    del loader
    return {
        "workers": workers,
        "rows_per_s": round(rows / dt, 1),
        "per_worker": round(rows / dt / max(1, workers), 1),
        # 0 workers: the work is this process's, so its CPU time is the work's (steadier than wall time on a busy host)
        "rows_per_cpu_s": round(rows / cpu, 1) if workers == 0 else None,
        "row_positions": cfg.seq_len,
        "documents_per_row": round(pieces / piece_rows, 1),  # pieces: a document cut across rows counts in each
        "mb_per_batch": round(nbytes / 1e6 / batches, 2),
    }


def layout(data_dir: str, documents: int = 6000, reps: int = 3) -> dict:
    """Microseconds a document for `data.layout.layout_document` (the shape's skeleton cached, ids and pixels filled
    in) against laying each document out whole (`data.layout._layout`), alternating, on the study mixture's
    documents as a worker decodes them; the best of `reps` each."""
    from data.layout import _layout, _skeleton, layout_document
    from data.pipeline import to_segments

    cfg = _mixture(data_dir, 0)
    tok = Tokenizer(cfg.tokenizer)
    worker = StreamWorker(cfg, tok, 0, 1, None)
    segments = []
    for _ in range(documents):
        sample = worker.sources[worker._draw_source()].next()
        segments.append(to_segments(sample, tok.encode, cfg.image_spec, fingerprint=worker.fingerprint, tok=tok)[1])
    _skeleton.cache_clear()
    best = {"whole": float("inf"), "skeleton": float("inf")}
    for _ in range(reps):
        for name, lay in (("whole", _layout), ("skeleton", layout_document)):
            t0 = time.perf_counter()
            for seg in segments:
                lay(seg, tok.special, cfg.patch_size, cfg.position_scheme)
            best[name] = min(best[name], 1e6 * (time.perf_counter() - t0) / documents)
    return {
        "documents": documents,
        "us_whole": round(best["whole"], 1),
        "us_skeleton": round(best["skeleton"], 1),
        "shapes": _skeleton.cache_info().currsize,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--tokenizer", default="artifacts/data/tokenizer.model")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--handoff", metavar="DIR", help="time the trainer's side of a batch handoff instead")
    ap.add_argument("--scaling", metavar="DIR", help="rows/s of the real loader per worker count instead")
    ap.add_argument("--workers", default="0,1,2,4,8", help="worker counts for --scaling and --independent")
    ap.add_argument("--store", metavar="ROWS", help="--scaling reads this row store (`python -m data.rows`)")
    ap.add_argument("--independent", metavar="DIR", help="rows/s of that many separate processes instead")
    ap.add_argument("--spin", action="store_true", help="an arithmetic loop in that many processes instead")
    ap.add_argument("--layout", metavar="DIR", help="a document's layout time, skeleton vs whole, on a study build")
    args = ap.parse_args(argv)
    if args.layout:
        r = layout(args.layout)
        print(
            f"layout of {r['documents']} documents ({r['shapes']} shapes): {r['us_whole']} us a document laid out "
            f"whole, {r['us_skeleton']} us from the shape's skeleton"
        )
        return
    if args.spin:
        results = [spin(int(n), args.seconds) for n in args.workers.split(",")]
        for r in results:
            print(f"{r['processes']:>3} processes: {r['loops_per_s']:>9} loops/s ({r['per_process']} each)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    if args.independent:
        results = [independent(args.independent, int(n), args.seconds) for n in args.workers.split(",")]
        for r in results:
            print(
                f"{r['processes']:>3} processes: {r['rows_per_s']:>7} rows/s ({r['per_process']} each); a row "
                f"{r['user_ms_per_row']:.3f} ms user + {r['sys_ms_per_row']:.3f} ms system CPU, "
                f"{r['minor_faults_per_row']:.1f} page faults",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    if args.scaling:
        results = [scaling(args.scaling, int(n), args.seconds, args.store) for n in args.workers.split(",")]
        for r in results:
            print(
                f"{r['workers']:>3} workers: {r['rows_per_s']:>7} rows/s ({r['per_worker']} per worker"
                + (f", {r['rows_per_cpu_s']} per CPU-second" if r["rows_per_cpu_s"] else "")
                + "), "
                f"{r['documents_per_row']} documents a row of {r['row_positions']}, {r['mb_per_batch']} MB a batch",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    if args.handoff:
        results = [handoff(args.handoff, s) for s in ("file_descriptor", "file_system")]
        for r in results:
            print(
                f"{r['strategy']:<16} next(loader): {r['wall_ms_per_batch']:>6} ms wall, {r['cpu_ms_per_batch']} ms CPU"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
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
