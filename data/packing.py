"""Pack laid-out documents into fixed-length rows, and rows into the batch the model consumes.

Rules: documents are placed in arrival order; text may be cut anywhere to fill a row (the cut piece keeps its
positions, so RoPE distances inside it are unchanged); a cut never falls inside an image (<img> ... </img>); a
document with images that fits in one row is moved whole to a fresh row rather than cut; an image longer than a
row is an error the pipeline counts as a skip. Each row pads its tail with a padding "document" of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data.layout import IGNORE, LaidOut


class ImageTooLong(ValueError):
    """An image (with its framing tokens) does not fit in one row."""


def _safe_cut(spans, start: int, limit: int) -> int:
    """Largest cut <= start + limit that does not fall strictly inside an image span."""
    cut = start + limit
    for a, b in spans:
        if a < cut < b:
            cut = a
    return cut


@dataclass
class Row:
    length: int
    pieces: list[tuple[LaidOut, int, int]] = field(default_factory=list)  # (doc, start, end)
    used: int = 0

    @property
    def free(self) -> int:
        return self.length - self.used

    def add(self, doc: LaidOut, start: int, end: int):
        self.pieces.append((doc, start, end))
        self.used += end - start

    def arrays(self, pad_id: int, patch_dim: int) -> dict:
        """The row's arrays: each field its pieces' slices and the padding tail, concatenated once (a loader makes
        thousands of rows a second; one slice assignment per field per piece cost more)."""
        pad = self.length - self.used
        fields: dict[str, list] = {k: [] for k in ("tokens", "patch_mask", "positions", "image_ids", "targets")}
        lengths, patches, images = [], [], 0
        for doc, s, e in self.pieces:
            fields["tokens"].append(doc.tokens[s:e])
            fields["patch_mask"].append(doc.is_patch[s:e])
            fields["positions"].append(doc.positions[s:e])
            fields["targets"].append(doc.targets[s:e])
            lengths.append(e - s)
            if not any(a < e and s < b for a, b in doc.spans):
                fields["image_ids"].append(np.full(e - s, -1, dtype=np.int64))  # no image in this piece
                continue
            local = doc.image_index[s:e]
            fields["image_ids"].append(np.where(local >= 0, local + images, -1))
            if (local >= 0).any():
                images += int(local.max()) + 1  # image ids stay unique within the row
                prior = int(doc.is_patch[:s].sum())  # patches before this piece, in sequence order
                patches.append(doc.patches[prior : prior + int(doc.is_patch[s:e].sum())])
        tails = {
            "tokens": np.full(pad, pad_id, dtype=np.int64),
            "patch_mask": np.zeros(pad, dtype=bool),
            "positions": np.zeros((pad, 3), dtype=np.int64),
            "image_ids": np.full(pad, -1, dtype=np.int64),
            "targets": np.full(pad, IGNORE, dtype=np.int64),
        }
        out = {k: np.concatenate([*fields[k], tails[k]]) for k in fields}
        # each piece its own document, the padding tail one more
        out["doc_ids"] = np.repeat(np.arange(len(lengths) + 1, dtype=np.int64), [*lengths, pad])
        out = {k: out[k] for k in ("tokens", "patch_mask", "positions", "doc_ids", "image_ids", "targets")}
        out["patches"] = np.concatenate(patches) if patches else np.zeros((0, patch_dim), dtype=np.uint8)
        out["pieces"] = [(doc.meta.get("key", ""), s, e) for doc, s, e in self.pieces]
        return out


class Packer:
    """Streaming packer: feed documents, take completed rows. Holds at most one open row.

    `add(doc, start)` begins mid-document: a resumed pipeline replays the row that was open at the checkpoint
    from the document (and offset) its first piece came from, and the rows that follow come out identical.
    """

    def __init__(self, seq_len: int, pad_id: int, patch_dim: int):
        self.seq_len, self.pad_id, self.patch_dim = seq_len, pad_id, patch_dim
        self.row = Row(seq_len)

    def add(self, doc: LaidOut, start: int = 0) -> list[dict]:
        done = []
        spans = doc.spans
        longest = max((b - a for a, b in spans), default=0)
        if longest > self.seq_len:
            raise ImageTooLong(f"an image takes {longest} positions; rows hold {self.seq_len}")
        while start < len(doc):
            rest = len(doc) - start
            if rest <= self.row.free:
                self.row.add(doc, start, len(doc))
                break
            if spans and rest <= self.seq_len and self.row.used:
                done.append(self._close())  # keep a multimodal document whole when it fits a fresh row
                continue
            cut = _safe_cut([(a, b) for a, b in spans if b > start], start, self.row.free)
            if cut > start:
                self.row.add(doc, start, cut)
                start = cut
            done.append(self._close())
        if self.row.free == 0:
            done.append(self._close())
        return done

    @property
    def open_row_start(self) -> tuple[LaidOut, int] | None:
        """(document, offset) of the open row's first piece: where a replay of this row begins."""
        return self.row.pieces[0][:2] if self.row.pieces else None

    def flush(self) -> list[dict]:
        return [self._close()] if self.row.used else []

    def _close(self) -> dict:
        arrays = self.row.arrays(self.pad_id, self.patch_dim)
        self.row = Row(self.seq_len)
        return arrays


# target_index is padded to a multiple of this, so that its length, which varies per batch, takes few values
TARGET_INDEX_MULTIPLE = 16


def target_index(targets: np.ndarray) -> np.ndarray:
    """Flat positions (row * T + t) of the positions that have a target, ascending, padded with -1 to a multiple of
    TARGET_INDEX_MULTIPLE (at least one multiple). The model runs its output head at these positions only; made
    here, on the CPU, because their count is data-dependent and reading it on the GPU would make the host wait."""
    where = np.flatnonzero(targets.reshape(-1) != IGNORE)
    size = max(1, -(-len(where) // TARGET_INDEX_MULTIPLE)) * TARGET_INDEX_MULTIPLE
    return np.concatenate([where, np.full(size - len(where), -1, dtype=where.dtype)]).astype(np.int64)


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack packed rows into the model's batch (tensors only: it is passed as `model(**batch)`)."""
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0] if k not in ("patches", "pieces")}
    batch["patches"] = torch.from_numpy(np.concatenate([r["patches"] for r in rows]))
    batch["target_index"] = torch.from_numpy(target_index(batch["targets"].numpy()))
    return batch


def document_batch(doc: LaidOut) -> dict[str, torch.Tensor]:
    """One document as a one-row batch (a generation prompt, or an unpacked reference)."""
    row = Row(len(doc))
    row.add(doc, 0, len(doc))
    arrays = row.arrays(pad_id=0, patch_dim=doc.patches.shape[1] if len(doc.patches) else 0)
    return collate([arrays])
