"""Decode any image Pillow reads into a (3, H, W) uint8 array whose sides are multiples of the patch.

Every mode goes to RGB (alpha composited on white, 16-bit scaled, palette expanded), EXIF orientation applied,
then the image is resized, keeping its aspect ratio, to fit a patch budget. The pixel cap is checked from the
header, before any pixel is decoded, so a decompression bomb costs nothing. Pixels stay uint8 all the way to the
GPU (the model maps them to [-1, 1]): a quarter of the bytes of floats to hand from loader workers to the trainer.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


class Skip(ValueError):
    """A sample (or an image in it) that cannot be used; `reason` is the counter the pipeline skips it under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageSpec:
    patch_size: int = 8
    max_patches: int = 256  # per image after resizing
    max_pixels: int = 64_000_000  # header-declared width * height above this is refused


def fit_to_budget(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """Largest size with the same aspect ratio (sides rounded to the patch) within max_patches; never upscales
    beyond rounding, and never below one patch per side."""
    p = spec.patch_size
    scale = min(1.0, math.sqrt(spec.max_patches * p * p / (width * height)))
    cols = max(1, round(width * scale / p))
    rows = max(1, round(height * scale / p))
    while cols * rows > spec.max_patches:  # rounding up can overshoot the budget by a row or a column
        if cols >= rows:
            cols -= 1
        else:
            rows -= 1
    return cols * p, rows * p


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    if not data:
        raise Skip("empty_member", "zero-byte image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > spec.max_pixels:
            raise Skip("image_too_large", f"{w}x{h} exceeds the {spec.max_pixels}-pixel cap")
        orientation = img.getexif().get(0x0112, 1)
        swapped = orientation in (5, 6, 7, 8)
        target = fit_to_budget(h, w, spec) if swapped else fit_to_budget(w, h, spec)  # size after rotation
        if img.format == "JPEG":  # decode at a reduced DCT scale when the target is much smaller
            img.draft("RGB", (target[1], target[0]) if swapped else target)
        if orientation != 1:  # exif_transpose would otherwise return a copy of the image, unchanged
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        if img.size != target:
            img = img.resize(target, Image.BICUBIC, reducing_gap=3.0)
        arr = np.asarray(img)
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip("image_too_large", str(e)) from e
    except Exception as e:  # Pillow raises many types for corrupt data (OSError, SyntaxError, ValueError...)
        raise Skip("bad_image", f"{type(e).__name__}: {e}") from e
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
