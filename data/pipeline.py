"""The streaming pipeline: shards -> samples -> documents -> packed rows -> batches, resumable exactly.

Streams. Every (rank, dataloader worker) pair is one of S = world * workers streams. In each epoch a source's
shards are permuted by (seed, source, epoch) and stream s takes every S-th shard from position s: no overlap, no
gap. A source with fewer shards than streams is split by sample instead (stream s takes every S-th sample of each
shard). Samples inside a shard are permuted by (seed, source, epoch, shard). Sources repeat independently, epoch
after epoch; a weighted draw per document (a per-stream RNG) mixes them.

State. A stream's position is tiny: per source (epoch, shard, offset), the mixture RNG's state, skip counts. Each
batch carries the replay point of the rows not yet delivered: the position just before the document that the
next row begins with, and the offset into it. The loader keeps, per worker, the replay point of the last batch
the trainer took, plus the number of batches taken (torch's DataLoader hands out batches from workers in turn,
so a resumed loader rotates which worker plays which stream). Restarting from that state yields exactly the
batches an uninterrupted run would have produced next.
"""

from __future__ import annotations

import bisect
import copy
import json
import os
import signal
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from data.handoff import Handed, HandedBatch, pack
from data.images import ImageSpec
from data.layout import LaidOut, layout_document
from data.packing import ImageTooLong, Packer, Row, collate
from data.prepared import PreparedMismatch, fingerprint, unchunk
from data.samples import Skip, to_segments
from data.shards import resolve_shards
from data.tokenizer import Tokenizer


class DataError(RuntimeError):
    """The data cannot feed the run (too many skips, a source with nothing readable, a mismatched resume)."""


@dataclass
class SourceConfig:
    name: str
    shards: str  # a dataset directory (with manifest.json), a brace pattern, or a glob
    weight: float = 1.0


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    eval_sources: list[SourceConfig] = field(default_factory=list)  # held-out shards, read once per evaluation
    tokenizer: str = ""
    seq_len: int = 512
    batch_size: int = 8  # packed rows per micro-batch on each rank
    workers: int = 2
    seed: int = 0
    shuffle: bool = True
    patch_size: int = 8
    max_image_patches: int = 256
    max_image_pixels: int = 64_000_000
    position_scheme: str = "mrope"
    max_skip_rate: float = 0.05  # skipped / read samples above this stops the run...
    skip_rate_min_samples: int = 200  # ...once a stream has read this many
    kinds: list[str] = field(default_factory=list)  # sample kinds read (text, caption, interleaved, chat); []: all
    rows: str = ""  # a row store made from this section (`python -m data.rows`): training reads its rows

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        self.eval_sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.eval_sources]
        for s in self.sources + self.eval_sources:
            if s.weight < 0:
                raise ValueError(f"source '{s.name}' has negative weight {s.weight}")
        for group in (self.sources, self.eval_sources):
            names = [s.name for s in group]
            if len(set(names)) < len(names):  # positions, metrics and resume are keyed by name
                raise ValueError(f"source names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(self.patch_size, self.max_image_patches, self.max_image_pixels)


def _seed(*parts) -> list[int]:
    return [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]


def truncated_keys(stream, path: str) -> set[str]:
    """Keys of samples whose members run past the end of the file. tarfile reads a cut member short without
    complaint, so check: an intact tar ends in zero blocks; only when it does not, scan the headers."""
    size = os.fstat(stream.fileno()).st_size
    stream.seek(max(0, size - 1024))
    tail = stream.read()
    stream.seek(0)
    if size % 512 == 0 and size >= 1024 and not tail.strip(b"\0"):
        return set()
    keys = set()
    try:
        with tarfile.open(fileobj=stream, mode="r:") as tf:
            try:
                while tf.next() is not None:
                    pass
            except tarfile.ReadError:
                pass  # raised on seeking past the cut; the members parsed so far are in tf.members
            keys = {base_plus_ext(m.name)[0] for m in tf.members if m.offset_data + m.size > size}
    except tarfile.TarError:
        pass  # not a tar at all: the reader below reports it
    stream.seek(0)
    return keys or {"__no_key__"}  # cut inside padding or a header: mark the shard truncated all the same


def read_shard(path: str, counts: Counter) -> list[dict]:
    """All samples of one shard; a shard that cannot be opened or read to the end is counted and warned about,
    and a sample cut short by truncation is dropped and counted, never passed on with partial bytes."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 - webdataset's expander reads it; closed below
    except OSError as e:
        counts["shard/unreadable"] += 1
        warnings.warn(f"skipping shard {path}: {e}", stacklevel=2)
        return []
    errors: list[Exception] = []

    def handler(exn):
        errors.append(exn)
        return True

    with stream:
        cut = truncated_keys(stream, path)
        files = tar_file_expander([{"url": path, "stream": stream}], handler=handler)
        samples = list(group_by_keys(files, handler=handler))
    if cut:  # whether webdataset dropped the cut member or passed the rest of its sample on, count it once
        samples = [s for s in samples if s["__key__"] not in cut]
        lost = len(cut - {"__no_key__"})
        counts["samples"] += lost
        counts["skip/truncated_sample"] += lost
    if errors or cut:
        counts["shard/unreadable" if not samples else "shard/truncated"] += 1
        detail = errors[0] if errors else "file ends inside a member"
        warnings.warn(f"shard {path}: {detail} ({len(samples)} samples read)", stacklevel=2)
    return unchunk(samples, counts)  # a prepared shard's chunks into their samples


# What a bad sample raises while it is decoded (images: PIL's OSError, SyntaxError, EOFError, DecompressionBombError,
# zlib's error; JSON and text: ValueError, KeyError; tar members: TarError). Anything else is a bug in this code and
# raises: a catch-all turned such bugs into counted skips, up to max_skip_rate of the data.
SAMPLE_ERRORS = (
    ValueError,
    KeyError,
    OSError,
    EOFError,
    SyntaxError,
    zlib.error,
    tarfile.TarError,
    Image.DecompressionBombError,
)


class SourceStream:
    """One source's samples as seen by one stream: shuffled, split, repeated over epochs (or one pass)."""

    def __init__(
        self, cfg: SourceConfig, stream: int, n_streams: int, seed: int, shuffle: bool, repeat: bool, counts: Counter
    ):
        self.name, self.stream, self.n_streams = cfg.name, stream, n_streams
        self.shards = resolve_shards(cfg.shards)
        if not self.shards:
            raise DataError(f"source '{cfg.name}': no shards match {cfg.shards!r}")
        self.seed, self.shuffle, self.repeat, self.counts = seed, shuffle, repeat, counts
        self.pos = {"epoch": 0, "shard": 0, "offset": 0, "base": 0}  # base: samples in earlier shards this epoch
        self._loaded: tuple | None = None  # (epoch, shard index, samples, order)
        self._planned: tuple[int, list] | None = None  # (epoch, plan): asked for once per sample

    def _plan(self, epoch: int) -> list[tuple[str, bool]]:
        """(shard path, split-by-sample) for this stream in this epoch."""
        if self._planned is None or self._planned[0] != epoch:
            self._planned = (epoch, self._make_plan(epoch))
        return self._planned[1]

    def _make_plan(self, epoch: int) -> list[tuple[str, bool]]:
        n = len(self.shards)
        order = np.random.default_rng(_seed(self.seed, self.name, epoch)).permutation(n) if self.shuffle else range(n)
        order = list(order)
        if n >= self.n_streams:
            return [(self.shards[i], False) for i in order[self.stream :: self.n_streams]]
        return [(self.shards[i], True) for i in order]

    def _load(self, epoch: int, index: int, path: str, by_sample: bool, base: int):
        samples = read_shard(path, self.counts)
        n = len(samples)
        # by file name, not path: a moved (or prepared, `data.prepared`) copy of a dataset is read in the same order
        rng = np.random.default_rng(_seed(self.seed, self.name, epoch, os.path.basename(path)))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if by_sample:  # the epoch's k-th sample (counting across shards from `base`) goes to stream k % S
            order = order[(self.stream - base) % self.n_streams :: self.n_streams]
        self._loaded = (epoch, index, samples, order)

    def next(self) -> dict | None:
        """The next raw sample, or None at the end of a one-pass stream."""
        barren = 0  # shards passed in a row without a sample; a whole epoch of them means there is nothing here
        while True:
            pos = self.pos
            plan = self._plan(pos["epoch"])
            if pos["shard"] >= len(plan):
                if not self.repeat:
                    return None
                self.pos = {"epoch": pos["epoch"] + 1, "shard": 0, "offset": 0, "base": 0}
                continue
            if self._loaded is None or self._loaded[:2] != (pos["epoch"], pos["shard"]):
                self._load(pos["epoch"], pos["shard"], *plan[pos["shard"]], pos["base"])
            _, _, samples, order = self._loaded
            if pos["offset"] < len(order):
                pos["offset"] += 1
                return samples[order[pos["offset"] - 1]]
            barren += 1
            if barren > len(plan):
                raise DataError(
                    f"source '{self.name}': stream {self.stream} of {self.n_streams} got no sample from its "
                    f"{len(plan)} shards (unreadable, empty, or fewer samples than streams)"
                )
            base = pos["base"] + len(samples)
            self.pos = {"epoch": pos["epoch"], "shard": pos["shard"] + 1, "offset": 0, "base": base}


class StreamWorker:
    """One stream: mixes its sources, turns samples into documents, packs rows, yields batches with state."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        stream: int,
        n_streams: int,
        state: dict | None,
        sources: list[SourceConfig] | None = None,
        repeat: bool = True,
    ):
        self.cfg, self.tok = cfg, tokenizer
        self.fingerprint = fingerprint(tokenizer.model_bytes, cfg.image_spec)  # what prepared samples must match
        self.counts: Counter = Counter()
        sources = cfg.sources if sources is None else sources
        if not sources:
            raise DataError("the data config lists no sources")
        self.sources = [
            SourceStream(s, stream, n_streams, cfg.seed, cfg.shuffle and repeat, repeat, self.counts) for s in sources
        ]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if weights.sum() <= 0:
            raise DataError("source weights sum to zero")
        self.weights = weights / weights.sum()
        cdf = self.weights.cumsum()
        self._cdf = (cdf / cdf[-1]).tolist()  # as Generator.choice(p=weights) builds it: see _draw_source
        self.rng = np.random.default_rng(_seed(cfg.seed, "mix", stream))
        self.repeat = repeat
        self.start = 0  # offset into the first document (a replayed row may begin mid-document)
        if state:
            saved = state["sources"]
            if isinstance(saved, list):  # checkpoints before positions were keyed by name: by order
                saved = {src.name: pos for src, pos in zip(self.sources, saved)}
            for src in self.sources:  # by name: reordered sources resume where each was; an added one starts anew
                if src.name in saved:
                    src.pos = dict(saved[src.name])
            self.rng.bit_generator.state = state["rng"]  # the setter copies the values
            self.counts.update(state["counts"])
            self.start = state["start"]

    def position(self) -> dict:
        return {
            "sources": {s.name: dict(s.pos) for s in self.sources},
            "rng": self.rng.bit_generator.state,  # the getter builds a fresh dict: no copy needed (once per document)
            "counts": dict(self.counts),
        }

    def _draw_source(self) -> int:
        """The next document's source: the draw `rng.choice(len(sources), p=weights)` makes (its cumulative
        table, one uniform draw, a right-bisection), without the argument checks it repeats on every call."""
        return bisect.bisect_right(self._cdf, self.rng.random()) if len(self.sources) > 1 else 0

    def documents(self) -> Iterator:
        while True:
            before = self.position()
            if self.repeat:
                i = self._draw_source()
                sample = self.sources[i].next()
            else:  # one pass: sources in order
                sample, i = None, 0
                for i, src in enumerate(self.sources):  # noqa: B007
                    sample = src.next()
                    if sample is not None:
                        break
                if sample is None:
                    return
            self.counts["samples"] += 1
            self.counts[f"source/{self.sources[i].name}"] += 1  # per source: how many epochs a run read (summary)
            doc = self.lay_out(sample, self.sources[i].name)
            if doc is None:
                continue
            doc.meta = {"key": f"{self.sources[i].name}/{sample['__key__']}", "source": i, "before": before}
            yield doc

    def lay_out(self, sample: dict, source: str) -> LaidOut | None:
        """A sample as the document the packer takes, or None for a skip (counted against max_skip_rate)."""
        try:
            kind, segments = to_segments(
                sample, self.tok.encode, self.cfg.image_spec, fingerprint=self.fingerprint, tok=self.tok
            )
            doc = layout_document(segments, self.tok.special, self.cfg.patch_size, self.cfg.position_scheme)
        except Skip as e:
            self._skip(e.reason)
            return None
        except PreparedMismatch as e:
            raise DataError(f"source '{source}': {e}") from e
        except SAMPLE_ERRORS as e:  # a sample that does not decode is counted under its type, not fatal
            self._skip(f"error_{type(e).__name__}")
            return None
        if self.cfg.kinds and kind not in self.cfg.kinds:  # counted against max_skip_rate: a wrong source stops
            self._skip(f"kind_{kind}_not_in_data.kinds")
            return None
        self.counts[f"kind/{kind}"] += 1
        return doc

    def _skip(self, reason: str):
        self.counts[f"skip/{reason}"] += 1
        seen = self.counts["samples"]
        skipped = sum(v for k, v in self.counts.items() if k.startswith("skip/"))
        if seen >= self.cfg.skip_rate_min_samples and skipped > self.cfg.max_skip_rate * seen:
            reasons = {k: v for k, v in self.counts.items() if k.startswith("skip/")}
            raise DataError(
                f"skipped {skipped} of {seen} samples ({skipped / seen:.1%}), over max_skip_rate="
                f"{self.cfg.max_skip_rate:.1%}: {reasons}"
            )

    def batches(self, worker: int) -> Iterator[dict]:
        """Batches of `batch_size` rows, each with the replay state of the first row not yet delivered."""
        cfg = self.cfg
        packer = Packer(cfg.seq_len, self.tok.special.pad, 3 * cfg.patch_size**2)
        pending: list[tuple[dict, dict]] = []  # (row, replay state of that row)
        open_replay = None  # replay state of the packer's open row
        start = self.start
        for doc in self.documents():
            was_empty = packer.open_row_start is None
            try:
                rows = packer.add(doc, start)
            except ImageTooLong:
                self._skip("image_too_long")
                start = 0
                continue
            # Each finished row began where the previous open row began; rows after the first begin in `doc`.
            for n, row in enumerate(rows):
                carried = n == 0 and not was_empty  # the row that was open before this document arrived
                replay = open_replay if carried else {**doc.meta["before"], "start": row["pieces"][0][1]}
                pending.append((row, replay))
            first = packer.open_row_start
            if first is None:
                open_replay = None
            elif rows or was_empty:
                open_replay = {**first[0].meta["before"], "start": first[1]}
            start = 0
            while len(pending) >= cfg.batch_size:
                yield self._batch(pending[: cfg.batch_size], pending[cfg.batch_size :], open_replay, worker)
                pending = pending[cfg.batch_size :]
        if not self.repeat:
            pending += [(row, None) for row in packer.flush()]
            for i in range(0, len(pending), cfg.batch_size):
                yield self._batch(pending[i : i + cfg.batch_size], [], None, worker)

    def _batch(self, rows, rest, open_replay, worker) -> dict:
        if rest:
            replay = rest[0][1]
        elif open_replay is not None:
            replay = open_replay
        else:
            replay = {**self.position(), "start": 0}
        batch = collate([r for r, _ in rows])
        batch["_meta"] = {
            "worker": worker,
            "state": replay,
            "pieces": [r["pieces"] for r, _ in rows],
            "counts": dict(self.counts),
        }
        return batch


class PackedDataset(IterableDataset):
    """The torch IterableDataset over one rank's streams; each dataloader worker runs one StreamWorker."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world: int = 1, resume: dict | None = None):
        self.cfg, self.rank, self.world, self.resume = cfg, rank, world, resume
        self.n_workers = max(1, cfg.workers)
        if resume is not None and (resume["world"], resume["workers"]) != (world, self.n_workers):
            raise DataError(
                f"the data state was saved with world={resume['world']} x workers={resume['workers']}; "
                f"resuming with world={world} x workers={self.n_workers} would change every stream"
            )

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        rotation = self.resume["consumed"] % self.n_workers if self.resume else 0
        logical = (physical + rotation) % self.n_workers  # batch k of a run comes from logical worker k % W
        state = self.resume["streams"][logical] if self.resume else None
        stream = self.rank * self.n_workers + logical
        worker = StreamWorker(self.cfg, Tokenizer(self.cfg.tokenizer), stream, self.world * self.n_workers, state)
        for batch in worker.batches(logical):  # one buffer a batch for the trainer's process (data.handoff)
            meta = batch.pop("_meta")
            buffer, layout = pack(batch)
            yield Handed(buffer, layout, meta)


def _as_made(batch: dict) -> dict:
    """The batch as the worker made it: torch's default_convert would walk every row's piece list (~1k tuples)
    looking for numpy arrays that are not there."""
    return batch


def _ignore_job_signals(_worker_id: int) -> None:
    """USR1 (SLURM's warning before preemption) and USR2 are the trainer's business, but SLURM delivers them to
    every process of a job step. Ignored here, they are also ignored by the torch_shm_manager a worker launches
    for `file_system` sharing; left at their default they killed it, and the next batch handoff failed
    ("Connection reset by peer") instead of the run checkpointing. TERM keeps DataLoader's own handler, which the
    loader's shutdown relies on.

    A worker also leaves its trainer's process group: torchrun stops a rank by signalling the rank's whole group
    (`killpg`, on SIGTERM or Ctrl-C to torchrun), which killed the workers before the rank could save ("DataLoader
    worker (pid ...) is killed by signal: Terminated"). Out of the group, they keep serving batches while the rank
    finishes its step and checkpoints, and they still exit with it (the loader's shutdown, or its watchdog when the
    rank dies)."""
    os.setpgid(0, 0)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class StreamingLoader:
    """Iterates training batches; `state_dict()` is the small object a checkpoint stores to resume exactly."""

    def __init__(
        self,
        cfg: DataConfig,
        rank: int = 0,
        world: int = 1,
        state: dict | None = None,
        pin_memory: bool = False,
        sharing: str = "file_system",
    ):
        """pin_memory: page-locked batches, so that copies to a GPU with non_blocking=True are truly async.
        sharing: how workers hand tensors to this process (torch.multiprocessing's strategy, process-wide).
        Named shared memory, not torch's default of a file descriptor per tensor sent over a socket: that round
        trip took 24 ms of the trainer's CPU per batch (`benchmarks/data_speed.py --handoff`)."""
        torch.multiprocessing.set_sharing_strategy(sharing)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.dataset = PackedDataset(cfg, rank, world, state)
        n = self.dataset.n_workers
        self.consumed = state["consumed"] if state else 0
        self.streams = list(state["streams"]) if state else [None] * n
        self.last_pieces: list = []  # (sample key, start, end) per row of the batch just returned
        self._worker_counts: dict[int, dict] = {}
        self._saved_counts = dict(state.get("counts", {})) if state else {}  # until a worker reports
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=cfg.workers,
            prefetch_factor=4 if cfg.workers else None,
            persistent_workers=False,
            pin_memory=pin_memory,
            collate_fn=_as_made,
            worker_init_fn=_ignore_job_signals,
        )
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        handed = next(self._it)
        meta = handed.meta
        self.streams[meta["worker"]] = meta["state"]
        self._worker_counts[meta["worker"]] = meta["counts"]
        self.consumed += 1
        self.last_pieces = meta["pieces"]
        return HandedBatch(handed.buffer, handed.layout)

    def close(self) -> None:
        """Stops the workers (they also stop with the loader's iterator when it is collected)."""
        self._it = None

    def skip_counts(self) -> dict:
        """Counters summed over this rank's workers: samples read, kinds, skips by reason, bad shards. A resumed
        loader reports the checkpoint's until a worker has made a batch, and a worker that has not yet, its stream's
        saved counts: a run resumed at its last step (killed after its last checkpoint, before its summary) reads
        nothing more, and its summary must still count what the run read."""
        if not self._worker_counts:
            return dict(self._saved_counts)
        total: Counter = Counter()
        for w, stream in enumerate(self.streams):
            total.update(self._worker_counts.get(w) or (stream or {}).get("counts", {}))
        return dict(total)

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "streams": copy.deepcopy(self.streams),
            "world": self.world,
            "workers": self.dataset.n_workers,
            "counts": self.skip_counts(),
        }


def source_samples(cfg: DataConfig) -> dict[str, int | None]:
    """Samples in each training source, from its manifest (None where a source has none: a glob of shards)."""
    sizes: dict[str, int | None] = {}
    for source in cfg.sources:
        specs = [source.shards] if isinstance(source.shards, str) else list(source.shards)
        manifests = [Path(s) / "manifest.json" for s in specs]
        ok = all(m.exists() for m in manifests)
        sizes[source.name] = sum(json.loads(m.read_text())["samples"] for m in manifests) if ok else None
    return sizes


def eval_batches(cfg: DataConfig, source: SourceConfig, rank: int = 0, world: int = 1) -> Iterator[dict]:
    """One deterministic pass over a held-out source, split across ranks (no workers: eval sets are small). Every
    batch has `batch_size` rows: the last, short one is filled with empty rows (padding: no targets, no patches), so
    a compiled forward meets one shape. Each source's own short batch otherwise compiled flex attention and its tile
    flags again: by their count (four sources, two functions), the eight recompiles an H200 logged beyond the
    training graph's in a study cell (docs/study/STUDY.md)."""
    tok = Tokenizer(cfg.tokenizer)
    worker = StreamWorker(cfg, tok, rank, world, None, sources=[source], repeat=False)
    empty = Row(cfg.seq_len).arrays(tok.special.pad, 3 * cfg.patch_size**2)  # all padding: one row's fields
    for batch in worker.batches(0):
        batch.pop("_meta")
        short = cfg.batch_size - int(batch["tokens"].shape[0])
        if short > 0:  # row fields only: the patches and target positions of the real rows stay as they are
            for k in ("tokens", "patch_mask", "positions", "doc_ids", "image_ids", "targets"):
                batch[k] = torch.cat([batch[k], torch.from_numpy(np.stack([empty[k]] * short))])
        yield batch
