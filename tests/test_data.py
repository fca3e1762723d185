"""Data: tokenizer, shard format and writer, image decoding, packing, the streaming pipeline and its resume."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import REPO, SPECIAL, mixture
from PIL import Image

from data.check import check
from data.images import ImageSpec, Skip, load_image
from data.layout import IGNORE, layout_document
from data.packing import TARGET_INDEX_MULTIPLE, ImageTooLong, Packer, collate
from data.pipeline import (
    DataError,
    SourceConfig,
    SourceStream,
    StreamingLoader,
    StreamWorker,
    eval_batches,
    read_shard,
)
from data.prepared import CHUNK_SAMPLES
from data.shards import DatasetWriter, resolve_shards
from data.tokenizer import CONTROL_SYMBOLS, Tokenizer, iter_texts
from data.tokenizer import main as tokenizer_cli


def image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_and_reserves_specials(embedded):
    tok = Tokenizer(embedded / "tokenizer.model")
    for text in [
        "a large red circle at the top left.",
        "O Romeo, Romeo! wherefore art thou Romeo?",
        "naïve café – Zürich, 東京, Ελληνικά, emoji 🙂",
    ]:
        assert tok.decode(tok.encode(text)) == text
    sp = tok.special
    assert (sp.pad, sp.bos, sp.eos) == (0, 2, 3)
    assert [tok.token_id(s) for s in CONTROL_SYMBOLS] == list(range(4, 4 + len(CONTROL_SYMBOLS)))
    assert sp.img_start not in tok.encode("<img> is only text here")  # specials are never produced by encoding


def test_a_tokenizer_built_before_the_chat_roles_loads_with_them_at_the_same_ids(tmp_path, monkeypatch):
    """The roles took the first spare slots: a tokenizer whose slots still carry the old names answers for the roles
    with those slots' ids, the ids a new tokenizer gives the roles."""
    import data.tokenizer as tokenizer

    texts = ["a red circle above a blue square. two green triangles."] * 50
    new = tokenizer.train_tokenizer(iter(texts), tmp_path / "new.model", vocab_size=300)
    old_names = tokenizer.IMAGE_TOKENS + tokenizer.REASONING_TOKENS + [f"<reserved_{i}>" for i in range(8)]
    monkeypatch.setattr(tokenizer, "CONTROL_SYMBOLS", old_names)
    old = tokenizer.train_tokenizer(iter(texts), tmp_path / "old.model", vocab_size=300)
    for role, former in tokenizer.FORMER_NAMES.items():
        assert old.token_id(role) == old.sp.piece_to_id(former) == new.token_id(role) != old.sp.unk_id()
    assert old.encode("<user> hi") == new.encode("<user> hi")  # never the control id, in either


def test_embedded_build_is_byte_identical_under_its_seed(embedded, tmp_path):
    """The same seed gives the same bytes, tokenizer included (with the same sentencepiece: the embedded tokenizer
    keeps NFKC, whose compiled table differs between sentencepiece versions)."""
    from data.embedded import build

    build(tmp_path / "again", scale=0.1, vocab_size=1024, cache=REPO / "artifacts" / "cache")
    files = sorted(p.relative_to(embedded) for p in embedded.rglob("*") if p.is_file() and p.name != "dataset.json")
    assert len(files) > 10 and any(f.name == "tokenizer.model" for f in files)
    for f in files:
        assert (embedded / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f


def test_tokenizer_cli_trains_on_shards(embedded, tmp_path):
    out = tmp_path / "tok.model"
    shards = resolve_shards(str(embedded / "text" / "train")) + resolve_shards(str(embedded / "scenes-qa" / "train"))
    tokenizer_cli(["train", *shards, "--out", str(out), "--vocab-size", "600", "--type", "unigram"])
    tok = Tokenizer(out)
    assert tok.vocab_size == 600
    text = next(iter_texts(shards[-1:]))  # the interleaved shard's text comes from its JSON segments
    assert text.startswith("question:") and tok.decode(tok.encode(text)) == text


# ----------------------------------------------------------------------------------------- shards format
def test_writer_respects_limits_and_manifest_matches(tmp_path):
    with DatasetWriter(tmp_path / "ds", max_samples=7, max_bytes=1e9) as w:
        for i in range(30):
            w.write(f"{i:04d}", {"txt": f"sample {i} " * 20})
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [7, 7, 7, 7, 2]
    for s in manifest["shards"]:
        with tarfile.open(tmp_path / "ds" / s["path"]) as t:
            assert len(t.getnames()) == s["samples"]
    with DatasetWriter(tmp_path / "big", max_samples=1000, max_bytes=20_000) as w:
        for i in range(30):
            w.write(f"{i:04d}", {"txt": "x" * 3000})
    sizes = [s["bytes"] for s in json.loads((tmp_path / "big" / "manifest.json").read_text())["shards"]]
    assert len(sizes) > 1 and max(sizes) <= 20_480  # the limit, up to tar's 10 KiB record


def test_writer_clis_and_img2dataset_layout(tmp_path, embedded):
    from data.shards import main as shards_cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 24), color).save(folder / f"p{i}.jpg")
        (folder / f"p{i}.txt").write_text(f"a {color} rectangle")
    shards_cli(["from-folder", str(folder), str(tmp_path / "folder-ds")])
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "plain text"},
                {"image": "photos/p0.jpg", "caption": "red"},
                {"segments": [{"text": "before"}, {"image": "photos/p1.jpg"}, {"text": "after"}]},
            ]
        )
    )
    shards_cli(["from-jsonl", str(jsonl), str(tmp_path / "jsonl-ds")])
    # img2dataset writes KEY.jpg + KEY.txt + KEY.json (metadata): it must read as a caption sample unchanged.
    with DatasetWriter(tmp_path / "img2dataset") as w:
        w.write(
            "000000000",
            {
                "jpg": (folder / "p0.jpg").read_bytes(),
                "txt": "a red rectangle",
                "json": {"url": "http://example.com/x.jpg", "caption": "a red rectangle", "status": "success"},
            },
        )
    spec = ImageSpec(8, 64)
    tok = str(embedded / "tokenizer.model")
    assert check([str(tmp_path / "folder-ds")], tok, spec)["counts"]["kind/caption"] == 3
    report = check([str(tmp_path / "jsonl-ds")], tok, spec)["counts"]
    assert (report["kind/text"], report["kind/caption"], report["kind/interleaved"]) == (1, 1, 1)
    assert check([str(tmp_path / "img2dataset")], tok, spec)["counts"] == {"kind/caption": 1, "samples": 1}


# ------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode", ["L", "LA", "P", "PT", "RGBA", "CMYK", "I;16", "I", "1"])
def test_every_mode_decodes_to_rgb(mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8), "RGB")
    if mode == "PT":
        img = base.convert("P")
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (30, 50)).astype(np.uint16))
        assert img.mode == "I;16"
    elif mode == "I":
        img = base.convert("L").convert("I")
    else:
        img = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I") else "PNG"
    arr = load_image(image_bytes(img, fmt), ImageSpec(patch_size=8, max_patches=64))
    assert arr.shape[0] == 3 and arr.shape[1] % 8 == 0 and arr.shape[2] % 8 == 0
    assert arr.dtype == np.uint8 and arr.std() > 12  # pixels, not a flat image


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (32, 16))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # left half red, right half blue
    img.paste((0, 0, 255), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    arr = load_image(image_bytes(img, "JPEG", exif=exif, quality=95), ImageSpec(patch_size=8, max_patches=64))
    assert arr.shape == (3, 32, 16)  # tall now
    top, bottom = arr[:, :16], arr[:, 16:]
    assert top[0].mean() > top[2].mean() and bottom[2].mean() > bottom[0].mean()  # red above blue


def test_resize_keeps_aspect_within_budget():
    spec = ImageSpec(patch_size=8, max_patches=64)
    for w, h in [(1000, 37), (37, 1000), (640, 480), (9, 9), (4000, 4000)]:
        arr = load_image(image_bytes(Image.new("RGB", (w, h), "gray"), "PNG"), spec)
        rows, cols = arr.shape[1] // 8, arr.shape[2] // 8
        assert rows * cols <= 64 and rows >= 1 and cols >= 1
        if min(w, h) >= 64:
            assert abs(np.log((cols / rows) / (w / h))) < 0.45, (w, h, cols, rows)


def test_pixel_cap_refuses_from_the_header():
    big = image_bytes(Image.new("L", (3000, 3000)), "PNG")  # compresses to a few KB, decodes to 9 MP
    with pytest.raises(Skip) as e:
        load_image(big, ImageSpec(max_pixels=1_000_000))
    assert e.value.reason == "image_too_large"


# ------------------------------------------------------------------------------------------------ packing
def test_layout_from_a_shared_skeleton_is_the_plain_layout():
    """layout_document lays a document's shape out once and fills in its ids and pixels: the same arrays as laying
    the whole document out (data.layout._layout), for text, images, prompts that are not targets, either position
    scheme, with and without <bos>/<eos>; the arrays documents share are read-only."""
    from data.layout import NoLoss, _layout, no_loss

    rng = np.random.default_rng(0)

    def text(n):
        return rng.integers(16, 64, n).tolist()

    def image(h, w, dtype=np.uint8):
        return rng.integers(0, 255, (3, h, w)).astype(dtype)

    docs = [
        [text(7)],
        [image(8, 12), text(5)],
        [text(3), image(4, 8, np.float32), text(0), image(8, 4), text(9)],
        [no_loss(text(4)), no_loss(image(8, 8)), text(6)],
        [NoLoss(text(2)), image(4, 4)],
        [],
    ]
    for segments, scheme, bos, eos in itertools.product(docs, ("mrope", "rope1d"), (True, False), (True, False)):
        for _ in range(2):  # the second time from the cached skeleton, with other ids and pixels of the same shape
            fast, plain = (
                layout_document(segments, SPECIAL, 4, scheme, bos, eos),
                _layout(segments, SPECIAL, 4, scheme, bos, eos),
            )
            for field in ("tokens", "is_patch", "positions", "image_index", "targets", "patches"):
                a, b = getattr(fast, field), getattr(plain, field)
                assert a.dtype == b.dtype and np.array_equal(a, b), (segments, scheme, bos, eos, field)
            assert fast.spans == plain.spans
            segments = [
                (s.view(type(s)) * 0 + 1 if isinstance(s, np.ndarray) else type(s)(x + 1 for x in s)) for s in segments
            ]
    shared = layout_document(docs[1], SPECIAL, 4)
    with pytest.raises(ValueError, match="read-only"):
        shared.positions[0, 0] = 5
    with pytest.raises(ValueError, match="multiple of patch_size"):
        layout_document([image(6, 8)], SPECIAL, 4)


def test_packing_never_splits_an_image_and_fills_rows():
    rng = np.random.default_rng(0)
    packer = Packer(64, SPECIAL.pad, 48)
    docs, rows = [], []
    for i in range(60):
        segs = [rng.integers(7, 60, int(rng.integers(1, 90))).tolist()]
        for _ in range(int(rng.integers(0, 3))):
            side = 4 * int(rng.integers(1, 4))
            segs.insert(int(rng.integers(0, len(segs) + 1)), rng.standard_normal((3, side, 4)).astype(np.float32))
        doc = layout_document(segs, SPECIAL, 4)
        doc.meta["key"] = i
        docs.append(doc)
        rows += packer.add(doc)
    rows += packer.flush()
    seen = Counter()
    for row in rows:
        assert len(row["tokens"]) == 64
        for img in set(row["image_ids"][row["image_ids"] >= 0].tolist()):
            where = np.flatnonzero(row["image_ids"] == img)
            assert row["tokens"][where[0] - 1] == SPECIAL.img_start and row["tokens"][where[-1] + 1] == SPECIAL.img_end
            assert np.all(np.diff(where) == 1)
        for key, s, e in row["pieces"]:
            seen[key] += e - s
        assert row["patches"].shape[0] == row["patch_mask"].sum()
    assert all(seen[d.meta["key"]] == len(d) for d in docs)  # every position of every document, exactly once
    with pytest.raises(ImageTooLong):
        packer.add(layout_document([np.zeros((3, 40, 40), np.float32)], SPECIAL, 4))
    batch = collate(rows)  # target_index: the flat positions with a target, ascending, then -1 to a multiple of 16
    listed = batch["target_index"].numpy()
    n = int((batch["targets"] != IGNORE).sum())
    assert len(listed) % TARGET_INDEX_MULTIPLE == 0 and len(listed) - TARGET_INDEX_MULTIPLE < n <= len(listed)
    np.testing.assert_array_equal(listed[:n], np.flatnonzero(batch["targets"].numpy().reshape(-1) != IGNORE))
    assert (listed[n:] == -1).all()


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    with DatasetWriter(root / "ds", max_samples=5) as w:
        for i in range(40):
            w.write(f"{i:04d}", {"txt": f"sample {i}"})
    return root / "ds"


@pytest.mark.parametrize("n_streams", [4, 16])  # 8 shards: split by shard, then by sample
def test_streams_split_an_epoch_with_no_overlap_and_no_gap(many_shards, n_streams):
    keys = []
    for s in range(n_streams):
        src = SourceStream(
            SourceConfig("t", str(many_shards)), s, n_streams, seed=3, shuffle=True, repeat=False, counts=Counter()
        )
        while (sample := src.next()) is not None:
            keys.append(sample["__key__"])
    assert sorted(keys) == [f"{i:04d}" for i in range(40)]


def test_mixture_follows_weights(embedded):
    cfg = mixture(embedded)
    worker = StreamWorker(cfg, Tokenizer(cfg.tokenizer), 0, 1, None)
    docs = worker.documents()
    sources = Counter(next(docs).meta["source"] for _ in range(1500))
    for i, src in enumerate(cfg.sources):
        assert abs(sources[i] / 1500 - src.weight) < 0.04, (src.name, sources[i])


def test_mixture_draws_are_numpys_choice(embedded):
    """The fast draw makes the choices `Generator.choice(p=weights)` makes from the same generator state, so runs
    keep their data order across the change (and with numpy's documented sampling)."""
    cfg = mixture(embedded)
    worker = StreamWorker(cfg, Tokenizer(cfg.tokenizer), 3, 4, None)
    reference = np.random.default_rng()
    reference.bit_generator.state = worker.rng.bit_generator.state
    ours = [worker._draw_source() for _ in range(5000)]
    assert ours == [int(reference.choice(len(cfg.sources), p=worker.weights)) for _ in range(5000)]
    assert len(set(ours)) == len(cfg.sources)


def run_loader(cfg, rank, world, n, state=None):
    loader = StreamingLoader(cfg, rank, world, state)
    out = []
    for _ in range(n):
        batch = next(loader)
        out.append((loader.last_pieces, batch["tokens"].clone(), batch["patches"].clone()))
    return out, loader.state_dict()


def test_a_resumed_loader_counts_what_the_run_read_before_it_draws(embedded):
    """A run resumed at its last step draws no batch, and its summary's per-source reads (the sweep's epochs columns)
    must still be the run's: the checkpoint's counts until a worker has made a batch, then each worker's, with its
    stream's saved counts for a worker that has not yet. (Found by the killed-sweep test: a cell killed after its
    last checkpoint and resumed reported 0 samples read.)"""
    cfg = mixture(embedded, workers=2, batch_size=2)
    _, state = run_loader(cfg, 0, 1, 5)
    state = json.loads(json.dumps(state))
    read = state["counts"]
    assert sum(v for k, v in read.items() if k.startswith("source/")) > 0
    resumed = StreamingLoader(cfg, 0, 1, state)
    assert resumed.skip_counts() == read
    next(resumed)  # one worker reports; the other still counts what its stream had read at the checkpoint
    after = resumed.skip_counts()
    assert after["samples"] >= sum(s["counts"]["samples"] for s in state["streams"]) and after != {}
    fresh = StreamingLoader(cfg, 0, 1)
    assert fresh.skip_counts() == {}


def test_exact_resume_with_workers_and_two_ranks(embedded):
    """Uninterrupted == stopped at step k and resumed: the same samples, in the same order, on every rank."""
    cfg = mixture(embedded, workers=2, batch_size=2)
    all_keys = []
    for rank in (0, 1):
        full, _ = run_loader(cfg, rank, 2, 11)
        head, state = run_loader(cfg, rank, 2, 5)  # 5: not a multiple of the worker count
        state = json.loads(json.dumps(state))  # the state is plain JSON-able data
        tail, _ = run_loader(cfg, rank, 2, 6, state)
        assert [p for p, _, _ in head + tail] == [p for p, _, _ in full]
        for (_, t1, p1), (_, t2, p2) in zip(head + tail, full):
            assert (t1 == t2).all() and (p1 == p2).all()
        all_keys += [(key, s, e) for pieces, _, _ in full for row in pieces for key, s, e in row]
    assert len(all_keys) == len(set(all_keys))  # ranks and workers never read the same piece


def test_a_handed_batch_is_the_workers_batch_in_one_buffer(embedded):
    """data.handoff: what the trainer's process receives from a worker is the batch the worker collated, tensor by
    tensor (values, dtypes, shapes), as views of one aligned buffer that moves to a device in one copy."""
    from data.handoff import ALIGN, HandedBatch, to_device
    from data.pipeline import StreamWorker
    from data.tokenizer import Tokenizer

    cfg = mixture(embedded, workers=1, batch_size=3)
    made = StreamWorker(cfg, Tokenizer(cfg.tokenizer), 0, 1, None).batches(0)
    loader = StreamingLoader(cfg, 0, 1)
    for _ in range(3):
        expected, handed = next(made), next(loader)
        expected.pop("_meta")
        assert isinstance(handed, HandedBatch) and list(handed) == list(expected)
        for name, t in expected.items():
            got = handed[name]
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
            assert got.untyped_storage().data_ptr() == handed.buffer.untyped_storage().data_ptr()  # a view
            assert (got.data_ptr() - handed.buffer.data_ptr()) % ALIGN == 0
        moved = to_device(handed, torch.device("cpu"))
        assert all(torch.equal(moved[k], expected[k]) for k in expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a copy stream needs a CUDA device")
def test_a_batch_copied_on_its_own_stream_is_what_the_step_reads():
    """data.handoff.SideCopy: the compute stream reads each batch whole, though its copy ran on another stream while
    the compute stream was still busy (a long matmul queued first): without the wait it would read a buffer the copy
    had not yet filled, and without record_stream the allocator could hand the buffer to the next copy too early."""
    from data.handoff import HandedBatch, SideCopy, pack

    device = torch.device("cuda")
    copy, busy = SideCopy(device), torch.randn(4096, 4096, device=device)
    sums = []
    for i in range(20):
        batch = {"tokens": torch.full((64, 4096), i, dtype=torch.int32), "x": torch.arange(1000.0) * i}
        busy = busy @ busy / 64  # keeps the compute stream busy while the copy runs
        moved = copy(HandedBatch(*pack(batch, pin_memory=True)))
        sums.append((moved["tokens"].sum(), moved["x"].sum()))
    for i, (tokens, x) in enumerate(sums):
        assert int(tokens) == 64 * 4096 * i and float(x) == 499500.0 * i


def test_a_side_copy_off_a_gpu_is_the_plain_copy():
    from data.handoff import HandedBatch, SideCopy, pack

    batch = {"tokens": torch.arange(12).view(3, 4), "mask": torch.tensor([True, False, True])}
    moved = SideCopy(torch.device("cpu"))(HandedBatch(*pack(batch)))
    assert SideCopy(torch.device("cpu")).stream is None
    assert all(torch.equal(moved[k], batch[k]) and moved[k].dtype == batch[k].dtype for k in batch)


def test_a_handed_batch_is_marked_once_a_plain_one_tensor_by_tensor():
    """What SideCopy marks in use by the compute stream: a handed batch's views share its buffer, so one of them; a
    plain batch's tensors each own their memory, so all of them."""
    from data.handoff import HandedBatch, one_per_storage, pack, to_device

    batch = {"tokens": torch.arange(12).view(3, 4), "mask": torch.tensor([True, False, True])}
    handed = to_device(HandedBatch(*pack(batch)), torch.device("cpu"))
    assert len(one_per_storage(handed.values())) == 1
    assert len(one_per_storage(to_device(batch, torch.device("cpu")).values())) == 2


def test_the_pinning_thread_pins_a_handed_batch_in_one_call(embedded, monkeypatch):
    """The DataLoader's pinning thread pins what a worker yields (data.handoff.Handed) with one call, its buffer
    pinned and its bookkeeping passed through untouched; as a dict, the same batch made it walk and copy hundreds
    of objects (the bookkeeping's every entry), Python that held the trainer's GIL."""
    from torch.utils.data._utils import pin_memory as pinning

    from data.handoff import Handed
    from data.pipeline import PackedDataset

    calls = []
    walk = pinning.pin_memory
    monkeypatch.setattr(pinning, "pin_memory", lambda data, device=None: calls.append(data) or walk(data, device))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: t.clone())  # no GPU to pin for here
    handed = next(iter(PackedDataset(mixture(embedded, workers=0, batch_size=8))))
    assert isinstance(handed, Handed)
    buffer, meta = handed.buffer, handed.meta
    pinned = pinning.pin_memory(handed)
    assert len(calls) == 1 and pinned.meta is meta and pinned.buffer is not buffer
    assert torch.equal(pinned.buffer, buffer)
    calls.clear()
    pinning.pin_memory({"_buffer": buffer, "_layout": handed.layout, "_meta": meta})
    assert len(calls) > 100


def test_seed_changes_the_order(embedded):
    a, _ = run_loader(mixture(embedded, workers=0), 0, 1, 3)
    b, _ = run_loader(mixture(embedded, workers=0, seed=1), 0, 1, 3)
    assert [p for p, _, _ in a] != [p for p, _, _ in b]


def test_resume_refuses_a_different_layout(embedded):
    _, state = run_loader(mixture(embedded, workers=0), 0, 1, 1)
    with pytest.raises(DataError, match="world=1 x workers=1"):
        StreamingLoader(mixture(embedded, workers=2), 0, 1, state)


def test_eval_pass_covers_each_sample_once_across_ranks(embedded):
    cfg = mixture(embedded)
    source = SourceConfig("val", str(embedded / "scenes-caption" / "val"))
    n_samples = json.loads((embedded / "scenes-caption" / "val" / "manifest.json").read_text())["samples"]
    rows = sum(int(b["tokens"].shape[0]) for rank in (0, 1) for b in eval_batches(cfg, source, rank, 2))
    assert rows > 0
    docs = 0
    for rank in (0, 1):
        worker = StreamWorker(cfg, Tokenizer(cfg.tokenizer), rank, 2, None, sources=[source], repeat=False)
        docs += sum(1 for _ in worker.documents())
    assert docs == n_samples


def test_the_last_eval_batch_is_filled_with_empty_rows_that_change_no_loss(embedded):
    """Every eval batch has `batch_size` rows (a compiled forward meets one shape); the short last one is filled
    with padding rows, which add no target and no patch: the model's loss sums over the real rows are unchanged."""
    from conftest import tiny_model_config

    from model import build_model

    cfg = mixture(embedded, batch_size=7)
    source = SourceConfig("val", str(embedded / "scenes-caption" / "val"))
    batches = list(eval_batches(cfg, source))
    worker = StreamWorker(cfg, Tokenizer(cfg.tokenizer), 0, 1, None, sources=[source], repeat=False)
    raw = [b for b in worker.batches(0)]
    assert len(batches) == len(raw) and int(raw[-1]["tokens"].shape[0]) < 7  # a short last batch to fill
    assert {int(b["tokens"].shape[0]) for b in batches} == {7}
    padded, short = batches[-1], raw[-1]
    n = int(short["tokens"].shape[0])
    for k in ("tokens", "patch_mask", "positions", "doc_ids", "image_ids", "targets", "patches", "target_index"):
        assert torch.equal(padded[k][:n] if k not in ("patches", "target_index") else padded[k], short[k]), k
    assert (padded["targets"][n:] == IGNORE).all() and not padded["patch_mask"][n:].any()
    vocab = Tokenizer(cfg.tokenizer).vocab_size
    model = build_model(
        tiny_model_config(
            vocab_size=vocab,
            patch_size=cfg.patch_size,
            max_image_patches=cfg.max_image_patches,
            max_seq_len=cfg.seq_len,
        )
    ).eval()
    with torch.no_grad():
        a, b = model(**padded), model(**{k: v for k, v in short.items() if k != "_meta"})
    torch.testing.assert_close(a.text_loss, b.text_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.image_loss, b.image_loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Shards holding each kind of bad sample once, among good ones, plus a truncated and an unreadable shard."""
    root = tmp_path_factory.mktemp("bad")
    good = image_bytes(Image.new("RGB", (16, 16), "red"), "JPEG")
    with DatasetWriter(root / "mixed", max_samples=1000) as w:
        for i in range(20):
            w.write(f"good{i:02d}", {"jpg": good, "txt": "a red square"})
        w.write("corrupt", {"jpg": good[:40] + b"\x00garbage" * 10, "txt": "broken jpeg"})
        w.write("zerobyte", {"jpg": b"", "txt": "empty image"})
        w.write("notutf8", {"jpg": good, "txt": b"caf\xe9 \xff\xfe"})
        w.write("badjson", {"0.jpg": good, "json": b'{"segments": [{"image": "0.jpg"}, {"te'})
        w.write("missing", {"0.jpg": good, "json": {"segments": [{"image": "1.jpg"}, {"text": "two images"}]}})
        w.write("huge", {"png": image_bytes(Image.new("L", (300, 300)), "PNG"), "txt": "too many pixels"})
    with DatasetWriter(root / "trunc", max_samples=5) as w:  # each sample: a 512 B header + 1024 B of text
        for i in range(10):
            w.write(f"t{i:02d}", {"txt": f"text sample number {i} " * 40})
    for shard, cut in (("shard-00000.tar", 3 * 1536 + 512 + 300), ("shard-00001.tar", 2 * 1536 + 100)):
        path = root / "trunc" / shard
        path.write_bytes(path.read_bytes()[:cut])  # inside the 4th sample's text; inside the 3rd's header
    (root / "garbage.tar").write_bytes(b"this is not a tar file" * 50)
    return root


def test_bad_samples_are_counted_by_reason(bad_shards, embedded):
    spec = ImageSpec(8, 64, max_pixels=50_000)
    counts = check([str(bad_shards / "mixed")], str(embedded / "tokenizer.model"), spec)["counts"]
    assert counts == {
        "samples": 26,
        "kind/caption": 20,
        "skip/bad_image": 1,
        "skip/empty_member": 1,
        "skip/bad_utf8": 1,
        "skip/bad_json": 1,
        "skip/missing_image": 1,
        "skip/image_too_large": 1,
    }


def test_check_cli_reports_skips(bad_shards, embedded, capsys):
    from data.check import main as check_cli

    check_cli(
        [str(bad_shards / "mixed"), "--tokenizer", str(embedded / "tokenizer.model"), "--max-image-pixels", "50000"]
    )
    out = capsys.readouterr().out
    assert "samples: 26" in out and "good: 20" in out and "skip rate: 23.08%" in out and "skip/missing_image" in out
    with pytest.raises(SystemExit, match="missing: .*nowhere.tar"), pytest.warns(UserWarning):
        check_cli([str(bad_shards / "nowhere.tar")])  # a path that does not exist: non-zero, named
    with pytest.raises(SystemExit, match="no good sample"), pytest.warns(UserWarning):
        check_cli([str(bad_shards / "garbage.tar")])  # read, but nothing good in it


def test_pipeline_survives_bad_shards_and_counts_them(bad_shards, embedded):
    sources = [
        SourceConfig("mixed", str(bad_shards / "mixed")),
        SourceConfig("trunc", str(bad_shards / "trunc")),
        SourceConfig("garbage", f"{bad_shards}/{{garbage,missing}}.tar"),
    ]  # not a tar; not there
    cfg = mixture(embedded, sources=sources, max_image_pixels=50_000, max_skip_rate=0.5, workers=0)
    with pytest.warns(UserWarning):
        worker = StreamWorker(cfg, Tokenizer(cfg.tokenizer), 0, 1, None, sources=sources, repeat=False)
        docs = list(worker.documents())
    c = worker.counts
    assert c["shard/truncated"] == 2 and c["shard/unreadable"] == 2
    assert c["skip/truncated_sample"] == 1  # the sample cut mid-text is dropped, not passed on short
    assert sum(v for k, v in c.items() if k.startswith("skip/")) == 7
    assert c["kind/caption"] == 20 and c["kind/text"] == 3 + 2  # the intact samples before each cut
    assert len(docs) == c["kind/caption"] + c["kind/text"]


def test_skip_rate_over_threshold_stops_with_a_clear_error(bad_shards, embedded):
    cfg = mixture(
        embedded,
        sources=[SourceConfig("mixed", str(bad_shards / "mixed"))],
        max_image_pixels=50_000,
        max_skip_rate=0.05,
        skip_rate_min_samples=10,
        workers=2,
    )
    loader = StreamingLoader(cfg)  # the error is raised in a dataloader worker and re-raised here
    with pytest.raises(DataError, match="over max_skip_rate=5.0%"):
        for _ in range(50):
            next(loader)


# ------------------------------------------------------------------------------------------ prepared shards
@pytest.fixture(scope="module")
def prepared(embedded, tmp_path_factory):
    """The embedded build prepared for patches of 8 (the mixture's), by the CLI, two processes."""
    from data.prepared import main as prepare_cli

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_cli([str(embedded), str(out), "--tokenizer", str(embedded / "tokenizer.model"), "--patch-size", "8",
                 "--workers", "2"])  # fmt: skip
    return out


def test_prepared_shards_feed_the_same_batches(embedded, prepared):
    """Read from prepared shards, the loader makes the batches it makes from the raw ones, bit for bit, and its
    state resumes either: the same shard names, sample order and keys, only tokenised and decoded already."""
    assert (prepared / "tokenizer.model").read_bytes() == (embedded / "tokenizer.model").read_bytes()
    manifest = json.loads((prepared / "scenes-qa" / "train" / "manifest.json").read_text())
    assert manifest["prepared"]["counts"]["written"] == manifest["samples"] > 0
    assert not list(prepared.rglob("*.tmp"))  # shards are renamed into place once a directory is done
    with tarfile.open(prepared / "scenes-qa" / "train" / manifest["shards"][0]["path"]) as tar:
        names = [m.name for m in tar]  # chunks of CHUNK_SAMPLES samples, one tar header each
    assert names == [f"{i:06d}.segs" for i in range(-(-manifest["shards"][0]["samples"] // CHUNK_SAMPLES))]
    assert len(names) > 1
    raw, _ = run_loader(mixture(embedded, workers=2), 0, 1, 6)
    ours, state = run_loader(mixture(prepared, workers=2), 0, 1, 6)
    assert [p for p, _, _ in ours] == [p for p, _, _ in raw]
    for (_, t1, p1), (_, t2, p2) in zip(ours, raw):
        assert (t1 == t2).all() and p1.dtype == torch.uint8 and (p1 == p2).all()
    tail, _ = run_loader(mixture(embedded, workers=2), 0, 1, 2, state)  # a prepared run resumed on raw shards
    full, _ = run_loader(mixture(embedded, workers=2), 0, 1, 8)
    assert [p for p, _, _ in tail] == [p for p, _, _ in full[6:]]


def test_prepared_shards_refuse_another_tokenizer_or_patch(embedded, prepared):
    from data.prepared import fingerprint

    model = Tokenizer(embedded / "tokenizer.model").model_bytes
    assert fingerprint(model, ImageSpec(8)) != fingerprint(
        model[:-1] + bytes([model[-1] ^ 1]), ImageSpec(8)
    )  # the model's bytes count
    assert fingerprint(model, ImageSpec(8)) != fingerprint(model, ImageSpec(8, max_patches=64))
    cfg = mixture(prepared, patch_size=16, workers=0)
    worker = StreamWorker(cfg, Tokenizer(cfg.tokenizer), 0, 1, None)
    with pytest.raises(DataError, match="another tokenizer, patch size or max_image_patches"):
        next(worker.batches(0))
    from data.prepared import prepare

    with pytest.raises(ValueError, match="must not be"):
        prepare(embedded, embedded / "inside", str(embedded / "tokenizer.model"), ImageSpec(8))


def test_a_damaged_prepared_sample_is_skipped_with_its_reason(prepared, tmp_path):
    """A damaged record is skipped when decoded; a chunk whose index is damaged is one counted skip, and the
    chunks around it still read."""
    from data.prepared import decode_chunk, decode_sample, encode_chunk

    src = prepared / "scenes-caption" / "train" / "shard-00000.tar"
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    records = [(k, bytes(r)) for k, r in decode_chunk(members[0][1])]
    records[1] = (records[1][0], records[1][1][:-5])  # short of its pixels
    records[2] = (records[2][0], records[2][1][:3])  # not even a header
    damaged = [encode_chunk(records), b"FSC1\x05\x00\x00\x00garbage"]
    with tarfile.open(tmp_path / "cut.tar", "w") as tar:
        for (m, data), new in itertools.zip_longest(members, damaged):
            data = data if new is None else new
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    counts: Counter = Counter()
    samples = read_shard(str(tmp_path / "cut.tar"), counts)
    outcomes = []
    for s in samples:
        try:
            outcomes.append(decode_sample(s["seg"], None)[0])
        except Skip as e:
            outcomes.append(e.reason)
    assert outcomes[:3] == ["caption", "bad_prepared", "bad_prepared"]
    assert len(outcomes) == len(records) + sum(len(decode_chunk(d)) for _, d in members[2:])
    assert counts == {"samples": 1, "skip/bad_prepared": 1}  # the second chunk


def test_tokenizer_trains_from_dataset_directories_and_patterns(embedded, tmp_path):
    """`python -m data.tokenizer train DIR` takes what data.check takes: a dataset directory (its shards), a brace
    pattern; a path with nothing in it is an error naming it, not an IsADirectoryError."""
    from data.tokenizer import Tokenizer, input_files
    from data.tokenizer import main as tokenizer_main

    shards = sorted((embedded / "text" / "train").glob("*.tar"))
    assert input_files([str(embedded / "text" / "train")]) == shards
    pattern = str(embedded / "text" / "train" / "shard-{00000..00000}.tar")
    assert input_files([pattern]) == shards[:1]
    tokenizer_main(
        ["train", str(embedded / "text" / "train"), "--out", str(tmp_path / "t.model"), "--vocab-size", "600"]
    )
    assert Tokenizer(tmp_path / "t.model").vocab_size > 256
    with pytest.raises(SystemExit, match="no text, JSONL or shard files"):
        tokenizer_main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "u.model")])


def test_a_bug_in_decoding_raises_instead_of_counting_as_a_skip(embedded, monkeypatch):
    """Bad samples are counted skips; an error that is not a data error (a TypeError from this code, say) raises
    instead of hiding among up to max_skip_rate of the samples."""
    from data import pipeline

    def buggy(*args, **kwargs):
        raise TypeError("unsupported operand type(s)")

    cfg = mixture(embedded, workers=0)
    monkeypatch.setattr(pipeline, "to_segments", buggy)
    worker = StreamWorker(cfg, Tokenizer(cfg.tokenizer), 0, 1, None)
    with pytest.raises(TypeError, match="unsupported operand"):
        next(worker.batches(0))


def test_stream_positions_are_kept_by_source_name(embedded):
    """A stream's state names its sources: restored into the same sources in another order, each source continues
    from its own position (by order, they would swap); a source the state does not name starts at its beginning."""
    cfg = mixture(embedded, workers=0)
    tok = Tokenizer(cfg.tokenizer)
    worker = StreamWorker(cfg, tok, 0, 1, None)
    batches = worker.batches(0)
    for _ in range(3):
        next(batches)
    state = worker.position()
    assert set(state["sources"]) == {s.name for s in cfg.sources}
    reordered = dataclasses.replace(cfg, sources=cfg.sources[::-1])
    again = StreamWorker(reordered, tok, 0, 1, {**state, "start": 0})
    assert {s.name: s.pos for s in again.sources} == state["sources"]
    fewer = {**state, "sources": {k: v for k, v in state["sources"].items() if k != cfg.sources[0].name}, "start": 0}
    added = StreamWorker(cfg, tok, 0, 1, fewer)
    assert added.sources[0].pos["epoch"] == 0 and added.sources[0].pos["shard"] == 0
    with pytest.raises(ValueError, match="source names repeat"):
        dataclasses.replace(cfg, sources=[cfg.sources[0], cfg.sources[0]])


def test_check_flags_documents_a_row_would_cut(embedded):
    """With a training config's row length, data.check lays documents out as training does and counts those longer
    than a row; a row long enough flags none."""
    tok, spec = str(embedded / "tokenizer.model"), ImageSpec(8, 64)
    short = check([str(embedded / "scenes-caption" / "val")], tok, spec, limit=50, seq_len=48)["counts"]
    long = check([str(embedded / "scenes-caption" / "val")], tok, spec, limit=50, seq_len=4096)["counts"]
    assert 0 < short["cut/longer_than_seq_len"] <= short["samples"] and "cut/longer_than_seq_len" not in long


def test_bytes_per_token_add_up_to_the_text(embedded):
    """Bits per byte divides by the UTF-8 bytes a text's ids stand for: summed over an encoding, they are the text's
    bytes (with the leading space sentencepiece adds), byte-fallback pieces included; control ids count none."""
    tok = Tokenizer(embedded / "tokenizer.model")
    table = tok.bytes_per_token()
    for text in ["a small red circle at the top left.", "naïve café, 数字 😀 and <0x41>"]:
        assert sum(table[i] for i in tok.encode(text)) == len((" " + text).encode())
    assert table[tok.special.bos] == table[tok.special.eos] == table[tok.special.patch] == 0
