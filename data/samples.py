"""The shard format: what a webdataset sample holds, and how it becomes a list of segments.

Members of one sample share a key (webdataset groups `KEY.ext` files). Three kinds, told apart by their members:
  text         KEY.txt                                   a text document
  caption      KEY.jpg|png|webp|... + KEY.txt [+ KEY.json] an image and its caption: img2dataset's output as is
                                                          (its KEY.json is metadata and is ignored)
  interleaved  KEY.json {"segments": [{"text": "..."}, {"image": "0.jpg"}, ...]} + KEY.0.jpg, KEY.1.png, ...
               each image segment names a member of the same sample by its extension
  prepared     KEY.seg: any of the three, tokenised and decoded by `python -m data.prepared` (stored in chunks of
               samples, which `data.pipeline.read_shard` unpacks)
A sample that cannot be used raises `Skip` with a counter name; the pipeline counts it and goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from data.images import ImageSpec, Skip, load_image
from data.prepared import decode_sample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def sample_kind(sample: dict) -> str:
    if "seg" in sample:
        return "prepared"
    meta = sample.get("json")
    if meta is not None and b'"segments"' in meta:
        return "interleaved"
    if meta is not None and b'"messages"' in meta:
        return "chat"
    if any(ext in sample for ext in IMAGE_EXTS):
        return "caption"
    if "txt" in sample:
        return "text"
    return "unknown"


def _text(data: bytes | None, what: str) -> str:
    if data is None:
        raise Skip("incomplete_sample", f"no {what}")
    if not data:
        raise Skip("empty_member", f"zero-byte {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("bad_utf8", f"{what}: {e}") from e


def _chat(sample: dict, tok, spec: ImageSpec) -> list:
    """A conversation (data.chat's messages; an image part is {"image": member}) laid out for fine-tuning: the
    assistant's writing is the only target."""
    from data.chat import ChatError, training_segments

    try:
        messages = json.loads(sample["json"])["messages"]
        for m in messages:
            parts = m.get("content", "")
            if isinstance(parts, list):
                m["content"] = [_part(p, sample, spec) for p in parts]
        return training_segments(messages, tok)
    except (ValueError, KeyError, TypeError, AttributeError, ChatError) as e:
        raise Skip("bad_json", f"chat: {e}") from e


def _part(part, sample: dict, spec: ImageSpec):
    if isinstance(part, dict) and isinstance(part.get("image"), str):
        member = part["image"].lower()
        if member not in sample:
            raise Skip("missing_image", f"a message refers to '{member}', not in the sample")
        return load_image(sample[member], spec)
    if isinstance(part, dict) and isinstance(part.get("text"), str):
        return part["text"]
    raise ValueError(f"a part is {{'text': ...}} or {{'image': member}}, got {part!r}")


def to_segments(
    sample: dict,
    encode: Callable[[str], list[int]],
    spec: ImageSpec,
    fingerprint: int | None = None,
    tok=None,
) -> tuple[str, list]:
    """(kind, segments): segments are token-id lists and (3, H, W) uint8 images, in reading order.
    fingerprint: what prepared samples must have been made with (`data.prepared.fingerprint`); None accepts any.
    tok: the tokenizer, which a chat sample needs for its role and reasoning tokens."""
    kind = sample_kind(sample)
    if kind == "prepared":
        return decode_sample(sample["seg"], fingerprint)
    if kind == "text":
        return kind, [encode(_text(sample["txt"], "text"))]
    if kind == "caption":
        ext = next(e for e in IMAGE_EXTS if e in sample)
        image = load_image(sample[ext], spec)
        return kind, [image, encode(_text(sample.get("txt"), "caption"))]
    if kind == "interleaved":
        try:
            doc = json.loads(sample["json"])
            segments = doc["segments"]
            if not isinstance(segments, list) or not segments:
                raise ValueError("'segments' is not a non-empty list")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise Skip("bad_json", str(e)) from e
        out = []
        for seg in segments:
            if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                out.append(encode(seg["text"]))
            elif isinstance(seg, dict) and isinstance(seg.get("image"), str):
                member = seg["image"].lower()
                if member not in sample:
                    raise Skip("missing_image", f"segment refers to '{member}', not in the sample")
                out.append(load_image(sample[member], spec))
            else:
                raise Skip("bad_json", f"segment {seg!r} has neither 'text' nor 'image'")
        return kind, out
    if kind == "chat":
        if tok is None:
            raise Skip("needs_tokenizer", "a chat sample is laid out with the tokenizer's role tokens")
        return kind, _chat(sample, tok, spec)
    raise Skip("unknown_kind", f"members {sorted(k for k in sample if not k.startswith('__'))}")
