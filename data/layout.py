"""Lay out one multimodal document as a flat sequence the model reads: tokens, patches, positions, targets.

A document is a list of segments, each a list of text token ids or an image array (C, H, W) whose sides are
multiples of the patch size: uint8 pixels as the loader decodes them, or floats already normalised (the model takes
either). Each image becomes <img> patches... </img>, its patches row by row:
  - "mrope":  patch (r, c) gets position ids (p, p + r, p + c) where p is the image's start; text after the image
              resumes at p + max(rows, cols), one past the image's largest id. Text gets equal (t, t, t) ids.
  - "rope1d": Fuyu's layout: a <row> token after each patch row and one running 1-D position for everything.
Targets are the next token wherever the next position is text; nothing predicts a patch, a <row> or </img>.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

IGNORE = -100


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    img_start: int
    img_end: int
    row_sep: int
    patch: int  # placeholder id stored at patch positions (never embedded, never a target)


@dataclass
class LaidOut:
    """One document as parallel arrays of length T, plus its P patches in sequence order."""

    tokens: np.ndarray  # (T,) int64
    is_patch: np.ndarray  # (T,) bool
    positions: np.ndarray  # (T, 3) int64
    image_index: np.ndarray  # (T,) int64, image number within the document or -1
    targets: np.ndarray  # (T,) int64, IGNORE where no target
    patches: np.ndarray  # (P, C * p * p), the images' dtype (uint8 pixels from the loader)
    spans: list  # [start, end) of each image with its <img> and </img>
    meta: dict = field(default_factory=dict)  # provenance the pipeline attaches (sample key, stream state)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_images(self) -> int:
        return int(self.image_index.max()) + 1 if len(self.image_index) else 0


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(C, H, W) -> (H/p * W/p, C * p * p), patches row by row, each flattened channel-first."""
    c, h, w = image.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image of {h}x{w} pixels is not a multiple of patch_size={p}")
    x = image.reshape(c, h // p, p, w // p, p).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(x.reshape((h // p) * (w // p), c * p * p))


@lru_cache(maxsize=64)
def _image_template(rows: int, cols: int, scheme: str, special: SpecialIds) -> tuple:
    """<img> patches... </img> for a rows x cols image, positions relative to the <img> token's: the same for every
    image of that shape, so built once (a loader lays out tens of thousands of short documents a second)."""
    if scheme == "mrope":
        n = rows * cols
        inner = np.full(n, special.patch, dtype=np.int64)
        rel = np.stack(
            [np.ones(n, dtype=np.int64), 1 + np.repeat(np.arange(rows), cols), 1 + np.tile(np.arange(cols), rows)], 1
        )
        end = 1 + max(rows, cols)
    else:  # a <row> after each row of patches, one running position
        inner = np.tile(np.append(np.full(cols, special.patch), special.row_sep), rows).astype(np.int64)
        rel = np.repeat(np.arange(1, 1 + len(inner), dtype=np.int64)[:, None], 3, 1)
        end = 1 + len(inner)
    tokens = np.concatenate([[special.img_start], inner, [special.img_end]]).astype(np.int64)
    positions = np.concatenate([np.zeros((1, 3), dtype=np.int64), rel, np.full((1, 3), end, dtype=np.int64)])
    is_patch = tokens == special.patch
    for a in (tokens, positions, is_patch):
        a.flags.writeable = False
    return tokens, positions, is_patch, end + 1


_RANGE3 = np.zeros((0, 3), dtype=np.int64)  # row t is (t, t, t): text positions are slices of it


def _text_positions(p: int, n: int) -> np.ndarray:
    """(n, 3) positions p..p+n-1, each repeated over the three rotary axes: a slice of one table, grown on demand
    (a loader lays out thousands of text segments a second)."""
    global _RANGE3
    if p + n > len(_RANGE3):
        _RANGE3 = np.repeat(np.arange(max(2 * (p + n), 4096), dtype=np.int64)[:, None], 3, 1)
        _RANGE3.flags.writeable = False
    return _RANGE3[p : p + n]


class NoLoss(list):
    """Token ids the model reads but is not trained to predict: the prompt side of a fine-tuning conversation
    (data.chat flags what the assistant wrote; everything else is laid out through `no_loss`)."""


class NoLossImage(np.ndarray):
    """An image whose markers are not predicted either (an image in a fine-tuning prompt)."""


def no_loss(segment):
    """The segment, read by the model but never a target."""
    if isinstance(segment, np.ndarray):
        return segment.view(NoLossImage)
    return NoLoss(segment)


def layout_document(
    segments: list,
    special: SpecialIds,
    patch_size: int,
    scheme: str = "mrope",
    bos: bool = True,
    eos: bool = True,
) -> LaidOut:
    # Everything but the text's ids and the pixels depends on the document's shape alone (its segments' kinds and
    # lengths), and a loader sees the same few shapes again and again: lay the shape out once (`_skeleton`), then
    # per document only write its ids in, shift them into targets, and cut its images into patches.
    shape, texts, patches = [], [], []
    for seg in segments:
        if isinstance(seg, np.ndarray):
            patches.append(patchify(np.asarray(seg), patch_size))  # an image it cannot cut raises here
            c, h, w = seg.shape
            shape.append(("i", c, h // patch_size, w // patch_size, isinstance(seg, NoLossImage)))
        else:
            shape.append(("t", len(seg), isinstance(seg, NoLoss)))
            texts.append(seg)
    tokens, is_patch, positions, image_index, follows, text_at, spans = _skeleton(
        tuple(shape), special, patch_size, scheme, bos, eos
    )
    tokens = tokens.copy()
    for (a, b), seg in zip(text_at, texts, strict=True):
        tokens[a:b] = seg
    targets = np.full(len(tokens), IGNORE, dtype=np.int64)
    np.copyto(targets[:-1], tokens[1:], where=follows)
    if len(patches) != 1:
        patches = np.concatenate(patches) if patches else np.zeros((0, 0), dtype=np.uint8)
    else:
        patches = patches[0]
    return LaidOut(
        tokens=tokens,
        is_patch=is_patch,
        positions=positions,
        image_index=image_index,
        targets=targets,
        patches=patches,
        spans=list(spans),
    )


@lru_cache(maxsize=2048)
def _skeleton(shape: tuple, special: SpecialIds, patch_size: int, scheme: str, bos: bool, eos: bool) -> tuple:
    """The layout of every document of this shape, made by `_layout` on a stand-in of it (text ids 0, blank
    images): its token ids but the text's, its patch flags, positions and image numbers (read-only: documents share
    them), which positions take the next id as their target, where its text segments go, its image spans."""
    segments = []
    for k, part in enumerate(shape):  # text segment k's stand-in ids are MARK + k, found again in the layout
        if part[0] == "i":
            _, c, rows, cols, quiet = part
            image = np.zeros((c, rows * patch_size, cols * patch_size), dtype=np.uint8)
            segments.append(image.view(NoLossImage) if quiet else image)
        else:
            _, n, quiet = part
            segments.append(NoLoss([MARK + k] * n) if quiet else [MARK + k] * n)
    doc = _layout(segments, special, patch_size, scheme, bos, eos)
    text_at = []
    for k, part in enumerate(shape):
        if part[0] == "t":
            where = np.flatnonzero(doc.tokens == MARK + k)
            text_at.append((int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0))
    follows = doc.targets[:-1] != IGNORE
    for a in (doc.tokens, doc.is_patch, doc.positions, doc.image_index, follows):
        a.flags.writeable = False
    return doc.tokens, doc.is_patch, doc.positions, doc.image_index, follows, tuple(text_at), tuple(doc.spans)


MARK = 1 << 40  # stand-in text ids, beyond any vocabulary


def _layout(
    segments: list,
    special: SpecialIds,
    patch_size: int,
    scheme: str = "mrope",
    bos: bool = True,
    eos: bool = True,
) -> LaidOut:
    if scheme not in ("mrope", "rope1d"):
        raise ValueError(f"position scheme '{scheme}' is not 'mrope' or 'rope1d'")
    # One array per segment, concatenated once: text positions are a range, an image's layout is a cached template
    # shifted to where it starts. Which positions are patches, inside an image or targets is set afterwards by slice.
    tokens, positions, images, patch_arrays, quiet = [], [], [], [], []
    p = at = 0
    if bos:
        tokens.append(np.array([special.bos], dtype=np.int64))
        positions.append(np.zeros((1, 3), dtype=np.int64))
        p = at = 1
    for seg in segments:
        if isinstance(seg, np.ndarray):
            patch_arrays.append(patchify(np.asarray(seg), patch_size))
            rows, cols = seg.shape[1] // patch_size, seg.shape[2] // patch_size
            tok, rel, flags, span = _image_template(rows, cols, scheme, special)
            tokens.append(tok)
            positions.append(rel + p)
            images.append((at, at + len(tok), flags))
            if isinstance(seg, NoLossImage):
                quiet.append((at, at + len(tok)))
            p, at = p + span, at + len(tok)
        else:
            n = len(seg)
            if isinstance(seg, NoLoss):
                quiet.append((at, at + n))
            tokens.append(np.asarray(seg, dtype=np.int64))
            positions.append(_text_positions(p, n))
            p, at = p + n, at + n
    if eos:
        tokens.append(np.array([special.eos], dtype=np.int64))
        positions.append(np.full((1, 3), p, dtype=np.int64))
        at += 1
    tokens_a = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
    is_patch = np.zeros(at, dtype=bool)
    image_index = np.full(at, -1, dtype=np.int64)
    is_target = np.ones(at, dtype=bool)  # text, <img> and <eos> are predicted; nothing inside an image, nor <bos>
    if bos:
        is_target[0] = False
    for k, (a, b, flags) in enumerate(images):
        is_patch[a:b] = flags
        image_index[a + 1 : b - 1] = k
        is_target[a + 1 : b] = False
    for a, b in quiet:
        is_target[a:b] = False
    targets = np.full(at, IGNORE, dtype=np.int64)
    np.copyto(targets[:-1], tokens_a[1:], where=is_target[1:])
    return LaidOut(
        tokens=tokens_a,
        is_patch=is_patch,
        positions=np.concatenate(positions) if positions else np.zeros((0, 3), dtype=np.int64),
        image_index=image_index,
        targets=targets,
        patches=np.concatenate(patch_arrays) if patch_arrays else np.zeros((0, 0), dtype=np.uint8),
        spans=[(a, b) for a, b, _ in images],
    )
