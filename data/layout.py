"""Lay out one multimodal document as a flat sequence the model reads: tokens, patches, positions, targets.

A document is a list of segments, each a list of text token ids or an image array (C, H, W) whose sides are
multiples of the patch size. Each image becomes <img> patches... </img>, its patches row by row:
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
    patches: np.ndarray  # (P, C * p * p) float32
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
    return np.ascontiguousarray(x.reshape((h // p) * (w // p), c * p * p), dtype=np.float32)


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
    tokens, is_patch, pos, img_idx, is_target, patch_arrays = [], [], [], [], [], []
    p = 0

    def put(tok, position, patch=False, image=-1, target=True):
        tokens.append(tok)
        is_patch.append(patch)
        pos.append(position)
        img_idx.append(image)
        is_target.append(target)

    if bos:
        put(special.bos, (0, 0, 0), target=False)
        p = 1
    n_images = 0
    for seg in segments:
        if isinstance(seg, np.ndarray):
            patches = patchify(seg, patch_size)
            rows, cols = seg.shape[1] // patch_size, seg.shape[2] // patch_size
            put(special.img_start, (p, p, p))
            p += 1
            for r in range(rows):
                for c in range(cols):
                    if scheme == "mrope":
                        put(special.patch, (p, p + r, p + c), patch=True, image=n_images, target=False)
                    else:
                        put(special.patch, (p, p, p), patch=True, image=n_images, target=False)
                        p += 1
                if scheme == "rope1d":
                    put(special.row_sep, (p, p, p), image=n_images, target=False)
                    p += 1
            if scheme == "mrope":
                p += max(rows, cols)
            put(special.img_end, (p, p, p), target=False)
            p += 1
            patch_arrays.append(patches)
            n_images += 1
        else:
            for tok in seg:
                put(int(tok), (p, p, p))
                p += 1
    if eos:
        put(special.eos, (p, p, p))
    tokens_a = np.asarray(tokens, dtype=np.int64)
    targets = np.full(len(tokens), IGNORE, dtype=np.int64)
    next_is_target = np.asarray(is_target[1:], dtype=bool)
    targets[:-1][next_is_target] = tokens_a[1:][next_is_target]
    return LaidOut(
        tokens=tokens_a,
        is_patch=np.asarray(is_patch, dtype=bool),
        positions=np.asarray(pos, dtype=np.int64).reshape(-1, 3),
        image_index=np.asarray(img_idx, dtype=np.int64),
        targets=targets,
        patches=np.concatenate(patch_arrays) if patch_arrays else np.zeros((0, 0), dtype=np.float32),
    )
