"""Rows packed once: a data config's stream of packed rows laid down ahead of training, so a loader only gathers.

    python -m data.rows CONFIG OUT --rows N [--streams 16] [--workers 16] [--set KEY=VALUE ...]

Why: a tiny model's step eats rows faster than the host can pack them. A depth-1 study cell's captured step eats
about 72,000 rows of 512 a second on an H200; on that GPU's host one loader worker packs about 3,300 a second
(reading, layout and packing in Python) and sixteen independent workers together 16,128 (docs/study/STUDY.md,
docs/perf/host_cores_h200.json). The rows of a study do not change from cell to cell (same data, seed and row
length), so they are packed once, by the real pipeline (`data.pipeline.StreamWorker`), into a store that every cell
reads: a batch is then a handful of vectorised gathers from memory-mapped arrays. This is the index Megatron and
OLMo build over pre-tokenised documents (documents stored once, rows as lists of document ranges), made here by our
own packer so a stored row is bit for bit the row the streaming loader would have made.

The store (OUT): `rows.json` (the data fields the rows depend on, the streams, the rows per stream, the table's
sizes, the build's counts); one table of every usable training document, laid out once, as flat arrays over all
their positions (tokens, patch_mask, positions, targets, image_index, patch_no), their patches, each document's
first position and its sample key (`keys.json`); and per stream s a directory sNNN with its rows as pieces
(document, start, end) of that table and, per row, the samples read from each source so far (a run's epochs).
Stream s is exactly stream s of S of the streaming pipeline; a run reads batch j (counted over all ranks) as
`batch_size` consecutive rows of stream j mod S. Built under a temporary name and renamed when every stream is
done: a build killed midway leaves nothing that reads as a store, and a failed one removes what it wrote. The same
config and S give the same bytes with any --workers.

A run reads a store with `data.rows: OUT`; its data section must match the one the store was made from (sources
by name and weight, tokenizer, seed, row length, image budget, position scheme), else it stops with a DataError.
Validation still reads `data.eval_sources` through the streaming pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import time
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

from data.handoff import HandedBatch, pack
from data.layout import IGNORE
from data.packing import ImageTooLong, Packer, Row, target_index
from data.pipeline import DataConfig, DataError, SourceConfig, StreamingLoader, StreamWorker, read_shard
from data.shards import resolve_shards
from data.tokenizer import Tokenizer

FORMAT = 1
STREAMS = 16  # a store's streams unless --streams says otherwise
# per position of a stream's documents: name -> trailing shape (the dtypes: `field_dtypes`)
POSITION_FIELDS = {"tokens": (), "patch_mask": (), "positions": (3,), "targets": (), "image_index": (), "patch_no": ()}


def field_dtypes(vocab_size: int, patches: int) -> dict[str, str]:
    """The narrowest types that hold each field: token ids and targets (IGNORE is -100) in 16 bits where the
    vocabulary allows, image numbers in 16; `patch_no` indexes the table's `patches`, -1 where no patch. A study
    store is mostly its patches; these save about a fifth of the rest."""
    ids = "int16" if vocab_size <= np.iinfo(np.int16).max else "int32"
    return {
        "tokens": ids,
        "patch_mask": "bool",
        "positions": "int32",
        "targets": ids,
        "image_index": "int16",
        "patch_no": "int32" if patches <= np.iinfo(np.int32).max else "int64",
    }


def recipe(cfg: DataConfig, tokenizer_bytes: bytes) -> dict:
    """The data fields a packed row depends on (not where the shards live: a moved copy makes the same rows)."""
    return {
        "sources": [[s.name, s.weight] for s in cfg.sources],
        "tokenizer_crc32": zlib.crc32(tokenizer_bytes),
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "shuffle": cfg.shuffle,
        "patch_size": cfg.patch_size,
        "max_image_patches": cfg.max_image_patches,
        "max_image_pixels": cfg.max_image_pixels,
        "position_scheme": cfg.position_scheme,
        "kinds": list(cfg.kinds),
    }


class _PiecePacker(Packer):
    """The pipeline's packer, closing a row as its pieces (sample key, start, end) rather than its arrays."""

    def _close(self) -> list:
        pieces = [(doc.meta["key"], s, e) for doc, s, e in self.row.pieces]
        self.row = Row(self.seq_len)
        return pieces


class _Appender:
    """Raw arrays appended to files in a directory; `close()` returns each one's length."""

    def __init__(self, root: Path, names: list[str]):
        self.files = {n: open(root / f"{n}.bin", "wb") for n in names}  # noqa: SIM115 - closed in close()
        self.counts = dict.fromkeys(names, 0)

    def add(self, name: str, array: np.ndarray):
        self.files[name].write(np.ascontiguousarray(array).tobytes())
        self.counts[name] += len(array)

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        return self.counts


def _documents(cfg: DataConfig, source: SourceConfig, path: str):
    """(key, document) for each usable sample of one training shard, as the streaming pipeline lays it out."""
    worker = StreamWorker(cfg, Tokenizer(cfg.tokenizer), 0, 1, None)
    for sample in read_shard(path, worker.counts):
        doc = worker.lay_out(sample, source.name)
        if doc is not None:
            yield f"{source.name}/{sample['__key__']}", doc


def _measure_shard(cfg: DataConfig, source: SourceConfig, path: str) -> tuple[list, list, int]:
    """The shard's document keys, their positions, and its patches (a first pass: where each goes in the table)."""
    keys, lengths, patches = [], [], 0
    for key, doc in _documents(cfg, source, path):
        keys.append(key)
        lengths.append(len(doc))
        patches += int(doc.is_patch.sum())
    return keys, lengths, patches


def _write_shard(cfg: DataConfig, source: SourceConfig, path: str, out: str, first: int, first_patch: int) -> int:
    """The shard's documents into the table, from position `first` and patch `first_patch` on."""
    meta = json.loads((Path(out) / "table.json").read_text())
    table = _open_table(Path(out), meta, mode="r+")
    dtypes, at, patch_at, n = meta["dtypes"], first, first_patch, 0
    for _, doc in _documents(cfg, source, path):
        k, p = len(doc), int(doc.is_patch.sum())
        patch_no = np.full(k, -1, dtype=np.int64)
        patch_no[doc.is_patch] = np.arange(patch_at, patch_at + p)
        arrays = {
            "tokens": doc.tokens,
            "patch_mask": doc.is_patch,
            "positions": doc.positions,
            "targets": doc.targets,
            "image_index": doc.image_index,
            "patch_no": patch_no,
        }
        for name in POSITION_FIELDS:
            table[name][at : at + k] = arrays[name].astype(dtypes[name])
        if p:
            table["patches"][patch_at : patch_at + p] = np.asarray(doc.patches, dtype=np.uint8).reshape(p, -1)
        at, patch_at, n = at + k, patch_at + p, n + 1
    for m in table.values():
        if isinstance(m, np.memmap):  # an empty field is a plain array
            m.flush()
    return n


def _memmap(path: Path, dtype, shape: tuple, mode: str = "r") -> np.memmap:
    """A store file as an array, refused with the store's own error when its size is not what the build wrote."""
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    got = path.stat().st_size if path.is_file() else None
    if got != want:
        raise DataError(
            f"row store file {path} is {'missing' if got is None else f'{got:,} bytes'} where the build wrote "
            f"{want:,}: the store is damaged; build it again"
        )
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


def _table_shapes(meta: dict) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, shape) of each table file: per position fields, patches, each document's first position."""
    shapes = {k: (meta["dtypes"][k], (meta["positions"], *tail)) for k, tail in POSITION_FIELDS.items()}
    shapes["patches"] = ("uint8", (meta["patches"], meta["patch_dim"]))
    shapes["doc_start"] = ("int64", (meta["documents"] + 1,))
    return shapes


def _open_table(root: Path, meta: dict, mode: str = "r") -> dict:
    """The document table's memory maps."""
    out = {}
    for name, (dtype, shape) in _table_shapes(meta).items():
        if 0 in shape:
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            out[name] = _memmap(root / f"{name}.bin", dtype, shape, mode)
    return out


def build_stream(cfg: DataConfig, stream: int, streams: int, rows: int, out: str) -> dict:
    """Stream `stream` of `streams`: its first `rows` packed rows, as pieces (document, start, end) of the table."""
    root = Path(out) / f"s{stream:03d}"
    root.mkdir(parents=True)
    tok = Tokenizer(cfg.tokenizer)
    ids = {k: i for i, k in enumerate(json.loads((Path(out) / "keys.json").read_text()))}
    worker = StreamWorker(cfg, tok, stream, streams, None)
    packer = _PiecePacker(cfg.seq_len, tok.special.pad, 3 * cfg.patch_size**2)
    files = _Appender(root, ["pieces", "row_pieces", "counts"])
    names = [f"source/{s.name}" for s in cfg.sources]
    pieces = made = 0
    files.add("row_pieces", np.zeros(1, dtype=np.int64))
    for doc in worker.documents():
        try:
            closed = packer.add(doc, 0)
        except ImageTooLong:
            worker._skip("image_too_long")
            continue
        for row in closed:
            files.add("pieces", np.array([(ids[k], s, e) for k, s, e in row], dtype=np.int64))
            pieces += len(row)
            files.add("row_pieces", np.array([pieces], dtype=np.int64))
            files.add("counts", np.array([[worker.counts[n] for n in names]], dtype=np.int64))
            made += 1
            if made == rows:
                break
        if made == rows:
            break
    return {"stream": stream, "lengths": files.close(), "counts": dict(sorted(worker.counts.items()))}


def data_config(path: str, sets: list[str] = ()) -> DataConfig:
    """The `data` section of a training config YAML (no `base` chain), with KEY=VALUE overrides of its fields."""
    tree = yaml.safe_load(Path(path).read_text()) or {}
    data = dict(tree.get("data", tree))
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    for item in sets:
        key, _, value = item.partition("=")
        if key.removeprefix("data.") not in fields:
            raise SystemExit(f"--set {item}: DataConfig has no field {key!r}")
        data[key.removeprefix("data.")] = yaml.safe_load(value)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SystemExit(f"{path}: no `data` section, and {unknown} are not DataConfig fields")
    return DataConfig(**data)


def _map(pool, fn, args: list[tuple]) -> list:
    return list(pool.map(fn, *zip(*args, strict=True))) if pool else [fn(*a) for a in args]


def build(cfg: DataConfig, out: str, rows: int, streams: int = STREAMS, workers: int = 16) -> dict:
    """Writes the store; returns its rows.json. Refuses an existing OUT (a store is never half-replaced).

    First every training shard's documents, each laid out once into one table (two passes over the shards, in
    parallel: sizes, then the arrays at their offsets); then each stream's rows as pieces of that table. A stream
    meets the same documents again in later epochs, and other streams meet them too: stored per stream, a study's
    documents were stored 16 times over (50 GB and the H200 host's disk full before the build ended)."""
    if rows < 1 or streams < 1:
        raise ValueError(f"a row store needs at least one row and one stream (rows={rows}, streams={streams})")
    if Path(out).exists():
        raise FileExistsError(f"{out} exists; remove it to build the row store again")
    t0 = time.perf_counter()
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _build_into(cfg, tmp, rows, streams, workers)
    except BaseException:  # a full disk, a bad shard, Ctrl-C: no half-built store left behind to fill the disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)
    meta["build_seconds"] = round(time.perf_counter() - t0, 1)
    return meta


def _allocate(path: Path, nbytes: int) -> None:
    """A table file's whole size taken from the disk now: a full disk fails here with ENOSPC, not later as a SIGBUS
    in the process writing into its memory map."""
    with open(path, "wb") as f:
        if not nbytes:
            return
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot: sparse, as before
                raise
            f.truncate(nbytes)


def _build_into(cfg: DataConfig, tmp: Path, rows: int, streams: int, workers: int) -> dict:
    tok = Tokenizer(cfg.tokenizer)
    shards = [(cfg, src, path) for src in cfg.sources for path in resolve_shards(src.shards)]
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        sized = _map(pool, _measure_shard, shards)
        lengths = np.array([n for _, ls, _ in sized for n in ls], dtype=np.int64)
        patches = sum(p for _, _, p in sized)
        table = {
            "positions": int(lengths.sum()),
            "patches": patches,
            "documents": len(lengths),
            "patch_dim": 3 * cfg.patch_size**2,
            "dtypes": field_dtypes(tok.vocab_size, patches),
        }
        (tmp / "table.json").write_text(json.dumps(table))
        (tmp / "keys.json").write_text(json.dumps([k for keys, _, _ in sized for k in keys]))
        for name, (dtype, shape) in _table_shapes(table).items():
            if name != "doc_start":  # written whole below
                _allocate(tmp / f"{name}.bin", int(np.prod(shape)) * np.dtype(dtype).itemsize)
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp / "doc_start.bin")
        firsts = np.cumsum([0] + [sum(ls) for _, ls, _ in sized])
        patch_firsts = np.cumsum([0] + [p for _, _, p in sized])
        _map(pool, _write_shard, [(*s, str(tmp), int(a), int(b)) for s, a, b in zip(shards, firsts, patch_firsts)])
        done = _map(pool, build_stream, [(cfg, s, streams, rows, str(tmp)) for s in range(streams)])
    short = [d["stream"] for d in done if d["lengths"]["counts"] < rows]
    if short:
        raise DataError(f"streams {short} ended before {rows} rows (a one-pass source?)")
    meta = {
        "format": FORMAT,
        "data": recipe(cfg, tok.model_bytes),
        "streams": streams,
        "rows_per_stream": rows,
        "pad_id": tok.special.pad,
        "table": table,
        "lengths": [d["lengths"] for d in done],
        "counts": [d["counts"] for d in done],
    }
    (tmp / "rows.json").write_text(json.dumps(meta, indent=1))
    return meta


class RowStore:
    """A built store, read through memory maps (opened on first use; the gathering threads share them)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / "rows.json"
        if not path.is_file():
            raise DataError(f"{root} is not a row store (no rows.json); build it with `python -m data.rows`")
        self.meta = json.loads(path.read_text())
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{root}: row store format {self.meta.get('format')}, this code reads {FORMAT}")
        self.streams, self.rows_per_stream = self.meta["streams"], self.meta["rows_per_stream"]
        self.patch_dim, self.pad_id = self.meta["table"]["patch_dim"], self.meta["pad_id"]
        self._table: dict | None = None
        self._maps: dict[int, dict] = {}
        self._keys: list | None = None

    def check(self, cfg: DataConfig) -> None:
        """Stops a run whose data section would pack other rows than the stored ones."""
        want = recipe(cfg, Tokenizer(cfg.tokenizer).model_bytes)
        have = self.meta["data"]
        differ = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if differ:
            detail = "; ".join(f"{k}: store {a!r}, run {b!r}" for k, (a, b) in differ.items())
            raise DataError(f"the row store {self.root} was made from other data than this run's ({detail})")

    def _map(self, stream: int) -> dict:
        """The document table's maps and the stream's own (pieces, row_pieces, counts)."""
        if self._table is None:
            self._table = _open_table(self.root, self.meta["table"])
        if stream not in self._maps:
            d, n = self.root / f"s{stream:03d}", self.meta["lengths"][stream]
            shapes = {"pieces": (3,), "row_pieces": (), "counts": (len(self.meta["data"]["sources"]),)}
            own = {
                name: _memmap(d / f"{name}.bin", np.int64, (n[name], *tail))
                if n[name]
                else np.zeros((0, *tail), dtype=np.int64)
                for name, tail in shapes.items()
            }
            # plain arrays over the maps' buffers: numpy's memmap subclass made each gather 2-4x slower
            self._maps[stream] = {k: np.asarray(v) for k, v in {**self._table, **own}.items()}
        return self._maps[stream]

    def rows(self, stream: int, first: int, n: int) -> dict[str, np.ndarray]:
        """Rows first..first+n of a stream as the collated batch `data.packing.collate` makes from the same rows."""
        if first + n > self.rows_per_stream:
            raise DataError(
                f"the row store {self.root} holds {self.rows_per_stream} rows a stream; this run reads past it "
                f"(rows {first}..{first + n} of stream {stream}): build it with a larger --rows"
            )
        m, T = self._map(stream), self.meta["data"]["seq_len"]
        po = m["row_pieces"][first : first + n + 1]
        pieces = m["pieces"][po[0] : po[-1]]
        per_row = np.diff(po)
        row_of = np.repeat(np.arange(n), per_row)
        lens = pieces[:, 2] - pieces[:, 1]
        pad = T - np.bincount(row_of, weights=lens, minlength=n).astype(np.int64)
        # segments in row order: each row's pieces, then its padding
        seg_row = np.concatenate([row_of, np.arange(n)])
        seg_len = np.concatenate([lens, pad])
        seg_src = np.concatenate([m["doc_start"][pieces[:, 0]] + pieces[:, 1], np.zeros(n, np.int64)])
        seg_pad = np.concatenate([np.zeros(len(lens), bool), np.ones(n, bool)])
        order = np.argsort(seg_row * 2 + seg_pad, kind="stable")
        seg_row, seg_len, seg_src, seg_pad = seg_row[order], seg_len[order], seg_src[order], seg_pad[order]
        seg_first = np.cumsum(seg_len) - seg_len  # where each segment starts in the flat (n * T) output
        idx = np.repeat(seg_src - seg_first, seg_len) + np.arange(n * T)
        is_pad = np.repeat(seg_pad, seg_len)
        idx[is_pad] = 0
        # each row's segments numbered from 0: the pieces are its documents, the padding one more
        row_first_seg = np.searchsorted(seg_row, np.arange(n))
        seg_no = np.arange(len(seg_row)) - row_first_seg[seg_row]
        tokens = np.take(m["tokens"], idx).astype(np.int64)
        tokens[is_pad] = self.pad_id
        patch_mask = np.take(m["patch_mask"], idx) & ~is_pad
        positions = np.take(m["positions"], idx, axis=0).astype(np.int64)  # take: 4x fancy indexing's speed here
        positions[is_pad] = 0
        targets = np.take(m["targets"], idx).astype(np.int64)
        targets[is_pad] = IGNORE
        # image ids unique within a row, as data.packing.Row numbers them: each piece's images offset by the
        # images (highest local index + 1) of the row's earlier pieces
        local = np.take(m["image_index"], idx).astype(np.int64)
        local[is_pad] = -1
        top = np.full(len(seg_len), -1, dtype=np.int64)
        filled = seg_len > 0  # reduceat reads one element for an empty segment, and none past the end
        top[filled] = np.maximum.reduceat(local, seg_first[filled])
        inc = np.where(top >= 0, top + 1, 0)
        before = np.cumsum(inc) - inc
        offset = before - before[row_first_seg[seg_row]]
        image_ids = np.where(local >= 0, local + np.repeat(offset, seg_len), -1)
        patch_no = np.take(m["patch_no"], idx)[patch_mask]
        out = {
            "tokens": tokens.reshape(n, T),
            "patch_mask": patch_mask.reshape(n, T),
            "positions": positions.reshape(n, T, 3),
            "doc_ids": np.repeat(seg_no, seg_len).reshape(n, T),
            "image_ids": image_ids.reshape(n, T),
            "targets": targets.reshape(n, T),
            "patches": np.take(m["patches"], patch_no, axis=0).reshape(-1, self.patch_dim),
        }
        out["target_index"] = target_index(out["targets"])
        return out

    def samples_read(self, stream: int, first: int, n: int) -> np.ndarray:
        """Samples of each source the stream read to make rows first..first+n (on top of the rows before)."""
        counts = self._map(stream)["counts"]
        return counts[first + n - 1] - (counts[first - 1] if first else 0)

    def pieces(self, stream: int, first: int, n: int) -> list:
        """(sample key, start, end) per row: what the streaming loader reports as `last_pieces`."""
        if self._keys is None:
            self._keys = json.loads((self.root / "keys.json").read_text())
        m, keys = self._map(stream), self._keys
        po = m["row_pieces"]
        return [
            [(keys[d], int(s), int(e)) for d, s, e in m["pieces"][po[r] : po[r + 1]]] for r in range(first, first + n)
        ]


def batch_rows(index: int, streams: int, batch_size: int) -> tuple[int, int]:
    """(stream, first row) of the run's batch `index`, counted over all ranks: batches go round the streams."""
    return index % streams, (index // streams) * batch_size


def rows_needed(batches: int, streams: int, batch_size: int) -> int:
    """Rows a stream must hold for a run of `batches` batches over all ranks (the inverse of `batch_rows`)."""
    return -(-batches // streams) * batch_size


class RowLoader:
    """The streaming loader's interface over a row store: batches, `state_dict()`, `skip_counts()`, `last_pieces`.
    Its state is the number of batches this rank took: every batch is a function of that number.

    `data.workers` threads gather the next batches ahead (numpy's gathers run without the GIL). Worker processes
    would hand each 4.6 MB study batch over through a new shared-memory file, which cost more than the gather."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world: int = 1, state: dict | None = None, pin_memory=False):
        self.cfg, self.rank, self.world, self.pin = cfg, rank, world, pin_memory
        self.store = RowStore(cfg.rows)
        self.store.check(cfg)
        if state is not None:
            if state.get("kind") != "rows":
                raise DataError("the checkpoint's data state is the streaming loader's; this run reads a row store")
            if (state["world"], state["batch_size"]) != (world, cfg.batch_size):
                raise DataError(
                    f"the data state was saved with world={state['world']} x batch_size={state['batch_size']}; "
                    f"resuming with world={world} x batch_size={cfg.batch_size} would read other rows"
                )
        self.consumed = state["consumed"] if state else 0
        self.read = np.zeros(len(cfg.sources), dtype=np.int64)  # samples this rank's rows read, per source
        for c in range(self.consumed):  # a function of the batches taken, like everything else here
            self.read += self.store.samples_read(*self._where(c), cfg.batch_size)
        self._last: tuple[int, int] | None = None
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="rows") if cfg.workers else None
        self._ahead: deque = deque()  # (batch number, future), in order
        self._depth = 2 * cfg.workers + 1

    def _where(self, consumed: int) -> tuple[int, int]:
        return batch_rows(consumed * self.world + self.rank, self.store.streams, self.cfg.batch_size)

    def _make(self, consumed: int) -> dict:
        arrays = self.store.rows(*self._where(consumed), self.cfg.batch_size)
        batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if not self.pin:
            return batch
        buffer, layout = pack(batch, pin_memory=True)  # page-locked: one asynchronous copy to the GPU
        return HandedBatch(buffer, layout)

    def capacity(self) -> int:
        """Batches this rank can take before some stream runs out."""
        total = (self.store.rows_per_stream // self.cfg.batch_size) * self.store.streams  # over all ranks
        return max(0, -(-(total - self.rank) // self.world))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pool is None:
            batch = self._make(self.consumed)
        else:
            after = self._ahead[-1][0] + 1 if self._ahead else self.consumed
            for c in range(after, min(self.consumed + self._depth, self.capacity())):
                self._ahead.append((c, self._pool.submit(self._make, c)))
            if not self._ahead:  # past the end: the inline call raises the store's own error
                return self._make(self.consumed)
            c, future = self._ahead.popleft()
            assert c == self.consumed, "row store batches out of turn"
            batch = future.result()
        stream, first = self._where(self.consumed)
        self.read += self.store.samples_read(stream, first, self.cfg.batch_size)
        self._last = (stream, first)
        self.consumed += 1
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def last_pieces(self) -> list:
        return self.store.pieces(*self._last, self.cfg.batch_size) if self._last else []

    def skip_counts(self) -> dict:
        """Samples this rank's rows read, per source (as `source/NAME`) and in all; skips were the build's."""
        counts = {f"source/{s.name}": int(n) for s, n in zip(self.cfg.sources, self.read, strict=True)}
        return {"samples": sum(counts.values()), **counts}

    def state_dict(self) -> dict:
        return {"kind": "rows", "consumed": self.consumed, "world": self.world, "batch_size": self.cfg.batch_size}


def open_loader(
    cfg: DataConfig, rank: int = 0, world: int = 1, state: dict | None = None, pin_memory=False, **streaming
):
    """The training loader a data config asks for: the row store's when `data.rows` names one, else streaming
    (`streaming`: StreamingLoader's own options, e.g. `sharing`)."""
    if cfg.rows:
        return RowLoader(cfg, rank, world, state, pin_memory)
    if state is not None and state.get("kind") == "rows":
        raise DataError("the checkpoint's data state is a row store's; set data.rows to the store it read")
    return StreamingLoader(cfg, rank, world, state, pin_memory=pin_memory, **streaming)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a training config YAML (its data section) or a YAML of the data section alone")
    p.add_argument("out")
    p.add_argument("--rows", type=int, required=True, help="rows a stream (a run reads B rows of one stream a batch)")
    p.add_argument("--streams", type=int, default=STREAMS)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE over the data section (YAML value)")
    a = p.parse_args(argv)
    meta = build(data_config(a.config, a.set), a.out, a.rows, a.streams, a.workers)
    t = meta["table"]
    print(
        f"{a.out}: {meta['streams']} streams x {meta['rows_per_stream']:,} rows over {t['documents']:,} documents "
        f"stored once ({t['positions']:,} positions, {t['patches']:,} patches), {meta['build_seconds']} s"
    )


if __name__ == "__main__":
    main()
