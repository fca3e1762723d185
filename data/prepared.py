"""Prepared shards: samples stored tokenised and decoded, so that a loader worker only reads and packs.

    python -m data.prepared SRC OUT --tokenizer tok.model --patch-size 16 [--max-image-patches 256] [--workers N]

Why: on small documents a worker's time goes to per-sample work that is the same every epoch: SentencePiece,
Pillow decoding and resizing, and tar headers for each member (`benchmarks/data_speed.py --scaling`). Preparing
does it once, as Megatron's and OLMo's pre-tokenised datasets do for text, and stores samples in chunks, so that
reading a shard parses one tar header per CHUNK_SAMPLES samples.

OUT mirrors SRC: each dataset directory below SRC (one holding a manifest.json or *.tar) is written shard by
shard under the same names, samples in the same order with the same keys, so the loader's plan and shuffles are
the same and its batches are identical to those read from SRC; other files (the tokenizer, dataset.json) are
copied. A sample that cannot be used is dropped and counted in the new manifest's "prepared" entry, as the
loader would have skipped it. A directory's shards are written under temporary names and renamed only when all of
them are done, then its manifest: a prepare killed midway leaves no set that reads as complete (or as shards).

A chunk is one member, NNNNNN.segs (its index in the shard), little-endian: b"FSC1", uint32 number of samples, then
per sample uint32 key length, uint32 record length, the key (UTF-8, padded to 4 bytes) and the record. The loader
(`data.pipeline.read_shard`) unpacks chunks into samples {"__key__": KEY, "seg": record}, in order. A record:
    b"FSG1", uint32 fingerprint, int32 kind (0 text, 1 caption, 2 interleaved), int32 number of segments,
    then per segment int32 (type, a, b) and its payload:
      type 0, text:  a token ids as int32
      type 1, image: 3 x a x b uint8 RGB pixels (channels first), resized to the patch budget, padded to 4 bytes
The fingerprint names the tokenizer model and the image budget (patch size, patches per image) it was made
with; a run whose tokenizer or budget differs stops with `PreparedMismatch` instead of training on wrong ids.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import struct
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import webdataset as wds

from data.images import ImageSpec, Skip

MAGIC = b"FSG1"
CHUNK_MAGIC = b"FSC1"
CHUNK_SAMPLES = 32  # samples per chunk: the tar header's cost spread over 32; a shard cut short loses one chunk
KINDS = ("text", "caption", "interleaved")
_HEAD = struct.Struct("<4sIii")
_SEG = struct.Struct("<iii")
_CHUNK = struct.Struct("<4sI")
_ENTRY = struct.Struct("<II")


class PreparedMismatch(RuntimeError):
    """Prepared samples made with another tokenizer or image budget than the run's: a config error, not a skip."""


def fingerprint(tokenizer_model: bytes, spec: ImageSpec) -> int:
    """What a prepared sample depends on: the tokenizer model's bytes, the patch size and the patches per image."""
    return zlib.crc32(f"{spec.patch_size}/{spec.max_patches}".encode(), zlib.crc32(tokenizer_model))


def encode_sample(kind: str, segments: list, fp: int) -> bytes:
    """segments: token-id lists and (3, H, W) uint8 images, in reading order."""
    parts = [_HEAD.pack(MAGIC, fp, KINDS.index(kind), len(segments))]
    for seg in segments:
        if isinstance(seg, np.ndarray):
            _, h, w = seg.shape
            pixels = np.ascontiguousarray(seg, dtype=np.uint8).tobytes()
            parts += [_SEG.pack(1, h, w), pixels, b"\0" * (-len(pixels) % 4)]
        else:
            parts += [_SEG.pack(0, len(seg), 0), np.asarray(seg, dtype="<i4").tobytes()]
    return b"".join(parts)


def decode_sample(data: bytes, fp: int | None) -> tuple[str, list]:
    """(kind, segments) as `data.samples.to_segments` gives them; fp=None accepts any fingerprint."""
    try:
        magic, got, kind, n = _HEAD.unpack_from(data, 0)
        if magic != MAGIC:
            raise ValueError(f"magic {magic!r} is not {MAGIC!r}")
        if fp is not None and got != fp:
            raise PreparedMismatch(
                f"a prepared sample has fingerprint {got:08x}, this run expects {fp:08x}: it was prepared with "
                "another tokenizer, patch size or max_image_patches (the dataset's manifest.json says which)"
            )
        at, segments = _HEAD.size, []
        for _ in range(n):
            typ, a, b = _SEG.unpack_from(data, at)
            at += _SEG.size
            if typ == 0:
                segments.append(np.frombuffer(data, "<i4", a, at).tolist())
                at += 4 * a
            elif typ == 1:
                segments.append(np.frombuffer(data, np.uint8, a * b * 3, at).reshape(3, a, b))
                at += a * b * 3 + (-(a * b * 3) % 4)
            else:
                raise ValueError(f"segment type {typ}")
        if at != len(data):
            raise ValueError(f"{len(data) - at} bytes after the last segment")
        return KINDS[kind], segments
    except PreparedMismatch:
        raise
    except (ValueError, IndexError, struct.error) as e:
        raise Skip("bad_prepared", str(e)) from e


def encode_chunk(samples: list[tuple[str, bytes]]) -> bytes:
    """(key, record) pairs, in order, as one member."""
    parts = [_CHUNK.pack(CHUNK_MAGIC, len(samples))]
    for key, record in samples:
        name = key.encode()
        parts += [_ENTRY.pack(len(name), len(record)), name, b"\0" * (-len(name) % 4), record]
    return b"".join(parts)


def decode_chunk(data: bytes) -> list[tuple[str, memoryview]]:
    """The (key, record) pairs of a chunk; ValueError when its index is damaged. Records are views (no copies)."""
    try:
        magic, n = _CHUNK.unpack_from(data, 0)
        if magic != CHUNK_MAGIC:
            raise ValueError(f"chunk magic {magic!r} is not {CHUNK_MAGIC!r}")
        view, at, out = memoryview(data), _CHUNK.size, []
        for _ in range(n):
            key_len, rec_len = _ENTRY.unpack_from(data, at)
            at += _ENTRY.size
            key = bytes(view[at : at + key_len]).decode()
            at += key_len + (-key_len % 4)
            if at + rec_len > len(data):
                raise ValueError("a record runs past the chunk's end")
            out.append((key, view[at : at + rec_len]))
            at += rec_len
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError(str(e)) from e
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes after the last record")
    return out


def unchunk(samples: list[dict], counts: Counter) -> list[dict]:
    """Shard members as samples: each chunk becomes its samples, in order; other samples pass as they are. A chunk
    whose index is damaged is one counted skip (`bad_prepared`); a damaged record is skipped when decoded."""
    out = []
    for sample in samples:
        if "segs" not in sample:
            out.append(sample)
            continue
        try:
            out += [{"__key__": key, "seg": record} for key, record in decode_chunk(sample["segs"])]
        except ValueError:
            counts["samples"] += 1
            counts["skip/bad_prepared"] += 1
    return out


@functools.cache
def _tokenizer(path: str):
    """One per process of the pool, whatever the number of shards it prepares."""
    from data.tokenizer import Tokenizer

    return Tokenizer(path)


def _prepare_shard(job: tuple) -> dict:
    """One shard of SRC into OUT's `NAME.tmp`; returns its counts."""
    from data.pipeline import read_shard
    from data.samples import to_segments

    src, out, tokenizer, spec, fp = job
    tok = _tokenizer(tokenizer)
    counts: Counter = Counter()
    chunk: list[tuple[str, bytes]] = []  # written as it fills: decoded pixels take many times their JPEG's bytes

    def flush(writer):
        writer.write({"__key__": f"{counts['written'] // CHUNK_SAMPLES:06d}", "segs": encode_chunk(chunk)})
        counts["written"] += len(chunk)
        chunk.clear()

    with wds.TarWriter(str(out) + ".tmp", encoder=False, mtime=0) as writer:
        for sample in read_shard(str(src), counts):
            counts["samples"] += 1
            try:
                kind, segments = to_segments(sample, tok.encode, spec, fp, tok=tok)
            except Skip as e:
                counts[f"skip/{e.reason}"] += 1
                continue
            if kind == "chat":  # a prepared copy keeps ids, not which of them are targets
                raise ValueError(f"{src}: chat samples are read raw (their loss mask is not kept in a prepared copy)")
            chunk.append((sample["__key__"], encode_sample(kind, segments, fp)))
            if len(chunk) == CHUNK_SAMPLES:
                flush(writer)
        if chunk:
            flush(writer)
    return dict(counts)


def prepare(src: Path, out: Path, tokenizer: str, spec: ImageSpec, workers: int | None = None) -> dict:
    """Prepare every dataset directory below src into out; returns {relative dir: its counts}."""
    from data.shards import resolve_shards, write_manifest

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"{out} must not be {src} or inside it")
    fp = fingerprint(_tokenizer(str(tokenizer)).model_bytes, spec)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    dirs = sorted({p.parent for p in files if p.suffix == ".tar" or p.name == "manifest.json"})
    if not dirs:
        raise ValueError(f"{src} holds no dataset directory (manifest.json or *.tar)")
    for path in files:
        if path.suffix != ".tar" and path.name != "manifest.json":
            (out / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)  # the tokenizer, dataset.json
            shutil.copy2(path, out / path.relative_to(src))
    report = {}
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        for d in dirs:
            target = out / d.relative_to(src)
            target.mkdir(parents=True, exist_ok=True)
            jobs = [(Path(p), target / Path(p).name, str(tokenizer), spec, fp) for p in resolve_shards(str(d))]
            results = list(pool.map(_prepare_shard, jobs))
            entries = []
            for (_, shard, *_), c in zip(jobs, results):
                Path(str(shard) + ".tmp").replace(shard)
                entries.append({"path": shard.name, "samples": c.get("written", 0), "bytes": shard.stat().st_size})
            counts = sum((Counter(c) for c in results), Counter())
            info = {
                "tokenizer": str(tokenizer),
                "fingerprint": f"{fp:08x}",
                "patch_size": spec.patch_size,
                "max_image_patches": spec.max_patches,
                "counts": dict(sorted(counts.items())),
            }
            write_manifest(target, entries, prepared=info)
            report[str(d.relative_to(src))] = info["counts"]
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--patch-size", type=int, required=True)
    ap.add_argument("--max-image-patches", type=int, default=256)
    ap.add_argument("--max-image-pixels", type=int, default=64_000_000)
    ap.add_argument("--workers", type=int, help="processes (default: every core)")
    args = ap.parse_args(argv)
    spec = ImageSpec(args.patch_size, args.max_image_patches, args.max_image_pixels)
    report = prepare(args.src, args.out, args.tokenizer, spec, args.workers)
    for d, counts in report.items():
        skips = {k: v for k, v in counts.items() if k.startswith("skip/")}
        print(f"{d or '.'}: {counts.get('written', 0)} of {counts.get('samples', 0)} samples prepared", end="")
        print(f", skipped {skips}" if skips else "")


if __name__ == "__main__":
    main()
