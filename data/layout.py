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


def layout_document(
    segments: list,
    special: SpecialIds,
    patch_size: int,
    scheme: str = "mrope",
    bos: bool = True,
    eos: bool = True,
) -> LaidOut:
    if scheme not in ("mrope", "rope1d"):
        raise ValueError(f"position scheme '{scheme}' is not 'mrope' or 'rope1d'")
    # Parallel lists grown a segment at a time: `extend` runs at C speed, and documents are short enough that a numpy
    # array per segment would cost more than it saves. Position ids are kept as three lists (t, h, w).
    tokens, is_patch, img_idx, is_target, pt, ph, pw = [], [], [], [], [], [], []
    patch_arrays = []

    def put(tok, ids, patch, image, target):
        tokens.extend(tok)
        is_patch.extend(patch)
        img_idx.extend(image)
        is_target.extend(target)
        for column, values in zip((pt, ph, pw), ids):
            column.extend(values)

    p = 0
    if bos:
        put([special.bos], ([0], [0], [0]), [False], [-1], [False])
        p = 1
    for seg in segments:
        if isinstance(seg, np.ndarray):
            image = len(patch_arrays)
            patch_arrays.append(patchify(seg, patch_size))
            rows, cols = seg.shape[1] // patch_size, seg.shape[2] // patch_size
            start = p + 1  # after <img>
            if scheme == "mrope":
                inner = [special.patch] * (rows * cols)
                flags = [True] * len(inner)
                t_ids = [start] * len(inner)
                h_ids = [start + r for r in range(rows) for _ in range(cols)]
                w_ids = list(range(start, start + cols)) * rows
                ids = (t_ids, h_ids, w_ids)
                end = start + max(rows, cols)
            else:  # a <row> after each row of patches, one running position
                inner = ([special.patch] * cols + [special.row_sep]) * rows
                flags = ([True] * cols + [False]) * rows
                ids = (range(start, start + len(inner)),) * 3
                end = start + len(inner)
            put([special.img_start], ([p],) * 3, [False], [-1], [True])
            put(inner, ids, flags, [image] * len(inner), [False] * len(inner))
            put([special.img_end], ([end],) * 3, [False], [-1], [False])
            p = end + 1
        else:
            n = len(seg)
            put(seg, (range(p, p + n),) * 3, [False] * n, [-1] * n, [True] * n)
            p += n
    if eos:
        put([special.eos], ([p],) * 3, [False], [-1], [True])
    tokens_a = np.asarray(tokens, dtype=np.int64)
    targets = np.full(len(tokens), IGNORE, dtype=np.int64)
    next_is_target = np.asarray(is_target[1:], dtype=bool)
    targets[:-1][next_is_target] = tokens_a[1:][next_is_target]
    return LaidOut(
        tokens=tokens_a,
        is_patch=np.asarray(is_patch, dtype=bool),
        positions=np.array([pt, ph, pw], dtype=np.int64).reshape(3, -1).T.copy(),
        image_index=np.asarray(img_idx, dtype=np.int64),
        targets=targets,
        patches=np.concatenate(patch_arrays) if patch_arrays else np.zeros((0, 0), dtype=np.uint8),
    )
