"""The exported processor: text and images in reading order laid out exactly as this repo's data code lays them out
(the tokenizer, the image resize to the patch budget, <img> patches </img>, M-RoPE or 1-D positions), as the
model's inputs under transformers' names. One document a call, the prompt of `generate`.

    processor = AutoProcessor.from_pretrained(OUT, trust_remote_code=True)
    inputs = processor(["a photo:", Image.open("cat.png"), " it shows"])
    model.generate(**inputs, max_new_tokens=20)
"""

import io
import json
from pathlib import Path

from PIL import Image

from data.images import ImageSpec, load_image
from data.layout import layout_document
from data.packing import document_batch
from data.tokenizer import Tokenizer


class FusionProcessor:
    def __init__(self, tokenizer: str | Path, config: dict):
        self.tokenizer = Tokenizer(tokenizer)
        self.config = config
        self.spec = ImageSpec(config["patch_size"], config["max_image_patches"])

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "FusionProcessor":
        path = Path(path)
        return cls(path / "tokenizer.model", json.loads((path / "config.json").read_text())["fusion"])

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """AutoProcessor calls it on remote code; it matters only to `save_pretrained`, which train.export does."""

    def image(self, image) -> "object":
        """A PIL image, encoded bytes or a path -> (C, H, W) uint8, resized as the data pipeline resizes."""
        if isinstance(image, Image.Image):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = buffer.getvalue()
        elif isinstance(image, (str, Path)):
            image = Path(image).read_bytes()
        return load_image(image, self.spec)

    def __call__(self, segments: list, bos: bool = True, eos: bool = False, **kwargs) -> dict:
        parts = [self.tokenizer.encode(s) if isinstance(s, str) else self.image(s) for s in segments]
        scheme = self.config["position_scheme"]
        batch = document_batch(
            layout_document(parts, self.tokenizer.special, self.spec.patch_size, scheme, bos=bos, eos=eos)
        )
        positions = batch["positions"] if scheme == "mrope" else batch["positions"][..., 0]
        return {
            "input_ids": batch["tokens"],
            "positions": positions,
            "pixel_patches": batch["patches"],
            "patch_mask": batch["patch_mask"],
            "image_ids": batch["image_ids"],
            "doc_ids": batch["doc_ids"],
        }

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])
