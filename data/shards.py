"""Write datasets as webdataset tar shards with a manifest, and find the shards of a dataset again.

    python -m data.shards from-folder IMAGES_DIR OUT_DIR      # photo.jpg + photo.txt caption pairs
    python -m data.shards from-jsonl FILE.jsonl OUT_DIR       # {"text"} | {"image", "caption"} | {"segments"}
    [--max-samples 1000] [--max-bytes 256e6]

OUT_DIR gets shard-00000.tar, shard-00001.tar, ... and manifest.json: {"shards": [{"path", "samples",
"bytes"}], "samples", "bytes"}. The manifest is written last, atomically, so its presence means a complete set.
A shard holds at most max_samples samples and max_bytes of tar data (headers included; a single sample larger
than that gets a shard of its own); the file is then padded to tar's 10 KiB record.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

import braceexpand
import webdataset as wds

from data.samples import IMAGE_EXTS


class DatasetWriter:
    def __init__(self, out_dir: str | Path, max_samples: int = 1000, max_bytes: float = 256e6):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self.bytes = 0  # tar bytes of the open shard: webdataset's own limit counts payload, not headers
        self.writer = wds.ShardWriter(
            str(self.out / "shard-%05d.tar"),
            maxcount=1 << 62,
            maxsize=float("inf"),
            post=self._finished,
            verbose=0,
            encoder=False,
            mtime=0,
        )

    def _finished(self, fname: str):
        if self.writer.count:
            self.shards.append(
                {"path": Path(fname).name, "samples": self.writer.count, "bytes": os.path.getsize(fname)}
            )
        else:
            os.remove(fname)  # ShardWriter opens one shard ahead; an empty one is not part of the set

    def write(self, key: str, members: dict):
        """members: extension -> bytes | str | dict (json)."""
        sample = {"__key__": key}
        for ext, value in members.items():
            if isinstance(value, dict | list):
                value = json.dumps(value, ensure_ascii=False)
            sample[ext] = value.encode("utf-8") if isinstance(value, str) else value
        size = sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")  # header + padding
        if self.writer.count and (self.writer.count >= self.max_samples or self.bytes + size + 1024 > self.max_bytes):
            self.writer.next_stream()
            self.bytes = 0
        self.writer.write(sample)
        self.bytes += size

    def close(self) -> dict:
        self.writer.close()
        return write_manifest(self.out, self.shards)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_manifest(out: Path, shards: list[dict], **extra) -> dict:
    """manifest.json for the shards in `out`, written atomically: its presence means a complete set."""
    manifest = {
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        **extra,
    }
    tmp = Path(out) / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(Path(out) / "manifest.json")
    return manifest


def resolve_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a dataset directory (its manifest, else *.tar), a brace pattern, or a glob."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            manifest = p / "manifest.json"
            if manifest.exists():
                paths += [str(p / m["path"]) for m in json.loads(manifest.read_text())["shards"]]
            else:
                paths += sorted(str(x) for x in p.glob("*.tar"))
            continue
        for expanded in braceexpand.braceexpand(s):
            matches = sorted(glob.glob(expanded))
            paths += matches or [expanded]  # a named shard that is missing is reported when it is opened
    return paths


def from_folder(src: Path, writer: DatasetWriter) -> int:
    n = 0
    for img in sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
        caption = img.with_suffix(".txt")
        if not caption.exists():
            print(f"skip {img}: no {caption.name}")
            continue
        ext = img.suffix.lower().lstrip(".")
        writer.write(f"{n:08d}", {ext: img.read_bytes(), "txt": caption.read_text(encoding="utf-8").strip()})
        n += 1
    return n


def from_jsonl(src: Path, writer: DatasetWriter) -> int:
    base = src.parent
    n = 0
    for line in src.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        key = f"{n:08d}"
        if "segments" in rec:
            members, segments = {}, []
            for i, seg in enumerate(rec["segments"]):
                if "image" in seg:
                    path = base / seg["image"]
                    ext = f"{i}.{path.suffix.lower().lstrip('.')}"
                    members[ext] = path.read_bytes()
                    segments.append({"image": ext})
                else:
                    segments.append({"text": seg["text"]})
            writer.write(key, {**members, "json": {"segments": segments}})
        elif "image" in rec:
            path = base / rec["image"]
            writer.write(key, {path.suffix.lower().lstrip("."): path.read_bytes(), "txt": rec.get("caption", "")})
        else:
            writer.write(key, {"txt": rec["text"]})
        n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", choices=["from-folder", "from-jsonl"])
    ap.add_argument("input", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-samples", type=int, default=1000)
    ap.add_argument("--max-bytes", type=float, default=256e6)
    args = ap.parse_args(argv)
    with DatasetWriter(args.out, args.max_samples, args.max_bytes) as w:
        n = (from_folder if args.source == "from-folder" else from_jsonl)(args.input, w)
    print(f"wrote {n} samples to {args.out} in {len(w.shards)} shards")


if __name__ == "__main__":
    main()
