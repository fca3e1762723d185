"""The batched engine against row-by-row greedy decoding (model.generate): the same tokens for prompts of different
lengths with and without images, forked samples from one prefill, seeded sampling that repeats, stop ids and
per-row limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model_config

from data.layout import SpecialIds, layout_document
from data.packing import document_batch
from infer import Engine, SamplingParams
from model import build_model, generate

SPECIAL = SpecialIds(pad=0, bos=2, eos=3, img_start=4, img_end=5, row_sep=6, patch=7)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_model_config(d_model=64)
    return build_model(cfg).eval()


def prompts():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 8, 12), dtype=np.uint8)
    docs = [
        [[10, 11, 12]],
        [image, [20, 21]],  # an image, then text
        [rng.integers(8, 64, 17).tolist()],
        [[30, 31], image, [32]],  # interleaved
    ]
    return [document_batch(layout_document(d, SPECIAL, 4, eos=False)) for d in docs]


@pytest.mark.parametrize("static", [False, True], ids=["growing-cache", "static-cache"])
def test_batched_greedy_matches_row_by_row(model, static):
    """Also with the static cache (one step shape, attention over the whole buffer masked to what is written)."""
    engine = Engine(model, check_every=4, static=static)
    rows = engine.generate(prompts(), SamplingParams(max_new_tokens=12))
    for prompt, got in zip(prompts(), rows, strict=True):
        assert got == generate(model, prompt, max_new_tokens=12).tokens


def test_static_cache_reads_only_what_is_written_rounded_to_its_grain(model):
    """A long generation: the static cache's steps read a view that grows by grains (64 positions) with the written
    length, never the whole buffer from the first step, and give the row-by-row tokens all the same."""
    from infer.engine import StaticCache

    views = []

    class Recording(StaticCache):
        def set_view(self, keys):
            super().set_view(keys)
            views.append((keys, self.view, self.max_len))

    engine = Engine(model, check_every=4, static=True)
    engine.cache_class = Recording
    rows = engine.generate(prompts(), SamplingParams(max_new_tokens=100))
    for prompt, got in zip(prompts(), rows, strict=True):
        assert got == generate(model, prompt, max_new_tokens=100).tokens
    assert views[0][1] == 64 and views[-1][1] == views[-1][2] > 64  # the first steps read 64 keys, the last all
    assert all(keys <= view <= max(keys, max_len) and view - keys < 64 for keys, view, max_len in views)
    assert len({v for _, v, _ in views}) == 2


def test_a_static_engine_reuses_its_cache_across_calls(model):
    """Calls of one shape decode on the same cache and buffers (allocated once, graphs captured once on a GPU), and
    give what a fresh engine gives: other prompts whose padding differs (the last call's keys left in the buffer are
    never read), other stops and limits, and a call of another shape between them."""
    engine = Engine(model, check_every=4, static=True)
    params = SamplingParams(max_new_tokens=12)

    def fresh(batch, params, limits=None):
        return Engine(model, check_every=4, static=True).generate(batch, params, limits)

    first = engine.generate(prompts(), params)
    cache, buffers = engine._held.cache, engine._held.buffers
    flipped = prompts()[::-1]  # the same padded length, each row's padding another
    assert engine.generate(flipped, params) == fresh(flipped, params) == first[::-1]
    stop = first[2][3]
    stopped = SamplingParams(max_new_tokens=12, stop_ids=(stop,))
    assert engine.generate(prompts(), stopped, [5, 12, 12, 1]) == fresh(prompts(), stopped, [5, 12, 12, 1])
    assert engine._held.cache is cache and engine._held.buffers is buffers
    assert engine.generate(prompts()[:2], params) == first[:2]  # another shape: its own cache
    assert engine._held.cache is not cache
    assert engine.generate(prompts(), params) == first


@pytest.mark.parametrize("static", [False, True], ids=["growing-cache", "static-cache"])
def test_fork_draws_from_one_prefill(model, static):
    engine = Engine(model, static=static)
    prompt = prompts()[1]
    greedy = engine.fork(prompt, 3, SamplingParams(max_new_tokens=10))
    assert greedy == [generate(model, prompt, max_new_tokens=10).tokens] * 3
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a, b = engine.fork(prompt, 4, params), engine.fork(prompt, 4, params)
    assert a == b and len({tuple(r) for r in a}) > 1  # seeded: repeats; rows differ from one another
    assert a == Engine(model, static=not static).fork(prompt, 4, params)  # both caches sample the same tokens


def test_fork_each_prefills_many_prompts_once_and_samples_each(model):
    """Several prompts of different lengths (with and without images) in one prefill, three samples each: greedy,
    each prompt's samples are its row-by-row tokens; sampled, seeded draws repeat and rows differ."""
    engine = Engine(model, check_every=4)
    groups = engine.fork_each(prompts(), 3, SamplingParams(max_new_tokens=8))
    for prompt, group in zip(prompts(), groups, strict=True):
        assert group == [generate(model, prompt, max_new_tokens=8).tokens] * 3
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    a, b = engine.fork_each(prompts(), 4, params), engine.fork_each(prompts(), 4, params)
    assert a == b and all(len({tuple(r) for r in g}) > 1 for g in a)


@pytest.mark.parametrize("static", [False, True], ids=["growing-cache", "static-greedy-step"])
def test_stop_ids_and_per_row_limits(model, static):
    """Also through the static cache's greedy step, whose bookkeeping (lengths, stops) runs on the device."""
    engine = Engine(model, check_every=2, static=static)
    free = engine.generate(prompts(), SamplingParams(max_new_tokens=12))
    stop = free[2][3]  # a token row 2 emits at its 4th step
    rows = engine.generate(
        prompts(), SamplingParams(max_new_tokens=12, stop_ids=(stop,)), max_new_tokens=[5, 12, 12, 1]
    )
    assert rows[2] == free[2][: free[2].index(stop) + 1]  # ends with its stop id
    assert rows[0] == free[0][: min(5, free[0].index(stop) + 1 if stop in free[0] else 5)]
    assert len(rows[3]) == 1 and rows[3] == free[3][:1]


def test_compiled_greedy_step_gives_the_row_by_row_tokens(model):
    """The compiled engine's greedy decoding, one compiled call a token with the argmax and the bookkeeping inside
    it (`Engine._greedy_step`, fullgraph: nothing falls back to eager), gives model.generate's tokens for prompts
    with and without images; the other step is never called, and sampling still goes through it."""
    engine = Engine(model, check_every=4, compile=True)
    calls = []
    engine.step = lambda *a: calls.append(a) or Engine._step(engine, *a)
    rows = engine.generate(prompts(), SamplingParams(max_new_tokens=6))
    for prompt, got in zip(prompts(), rows, strict=True):
        assert got == generate(model, prompt, max_new_tokens=6).tokens
    assert not calls
    engine.generate(prompts()[:1], SamplingParams(max_new_tokens=3, temperature=1.0, seed=0))
    assert len(calls) == 2


@pytest.mark.parametrize("compile", [False, True], ids=["static", "compiled"])
def test_greedy_blocks_give_the_row_by_row_tokens_in_fewer_calls(model, compile):
    """`Engine(block=K)`: K greedy steps a call (compiled: one graph for K tokens) give model.generate's tokens,
    with stop ids and per-row limits, through views that grow past a grain; blocks start at multiples of K, so the
    checks for finished rows fall where one step at a time puts them, and the tail runs one step a call."""
    engine = Engine(model, check_every=4, static=True, compile=compile, block=2 if compile else 4)
    calls = {"block": 0, "step": 0}
    for name in calls:
        fn = getattr(engine, f"greedy_{name}")
        setattr(
            engine, f"greedy_{name}", lambda *a, fn=fn, name=name: calls.__setitem__(name, calls[name] + 1) or fn(*a)
        )
    new = 12 if compile else 100
    rows = engine.generate(prompts(), SamplingParams(max_new_tokens=new))
    for prompt, got in zip(prompts(), rows, strict=True):
        assert got == generate(model, prompt, max_new_tokens=new).tokens
    # steps 1..K-1 one a call, then blocks from step K while a whole block fits (100 new tokens at K=4: 24 blocks)
    assert calls == ({"block": 5, "step": 1} if compile else {"block": 24, "step": 3})
    if not compile:  # a tail shorter than a block goes one step a call: 14 tokens = 3 steps, blocks at 4 and 8, 2 steps
        calls.update(block=0, step=0)
        assert engine.generate(prompts(), SamplingParams(max_new_tokens=14)) == [r[:14] for r in rows]
        assert calls == {"block": 2, "step": 5}
    if not compile:
        one = Engine(model, check_every=2, static=True)
        free = one.generate(prompts(), SamplingParams(max_new_tokens=12))
        stop = free[2][3]
        params, limits = SamplingParams(max_new_tokens=12, stop_ids=(stop,)), [5, 12, 12, 1]
        blocked = Engine(model, check_every=4, static=True, block=4).generate(prompts(), params, max_new_tokens=limits)
        assert blocked == one.generate(prompts(), params, max_new_tokens=limits)
    assert Engine(model, block=2).static  # blocks decode on the static cache
    with pytest.raises(ValueError, match="divide check_every"):
        Engine(model, check_every=4, block=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine captures blocks as CUDA graphs on a GPU only")
def test_captured_blocks_give_the_step_by_step_tokens(model):
    """Compiled on a GPU, `Engine(block=K)` captures K compiled steps as one CUDA graph a view (the first block at a
    shape the compiled step has not met goes step by step) and replays it: the tokens are the uncompiled static
    engine's, through views past a grain, with stops and per-row limits, in a first call (compiles) and a second
    (captures again on its own buffers, nothing compiled)."""
    net = model.to("cuda")
    try:
        params = SamplingParams(max_new_tokens=150)
        expected = Engine(net, static=True).generate(prompts(), params)
        engine = Engine(net, check_every=8, compile=True, block=4)
        assert engine.generate(prompts(), params) == expected
        assert len(engine._graphs) >= 2  # views past a grain (64), each captured
        met = set(engine._met)
        assert engine.generate(prompts(), params) == expected and engine._met == met and len(engine._graphs) >= 2
        stop = expected[1][20]
        params, limits = SamplingParams(max_new_tokens=150, stop_ids=(stop,)), [150, 70, 9, 150]
        reference = Engine(net, static=True).generate(prompts(), params, limits)
        assert engine.generate(prompts(), params, limits) == reference
    finally:
        model.to("cpu")


@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param(
            "flex",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="flex's decoding kernel runs on CUDA (a CPU step takes SDPA)"
            ),
        ),
        "math",
        "triton",
        "sdpa",
    ],
)
def test_the_cached_step_kernels_give_sdpas_tokens(model, kernel, monkeypatch):
    """Each kernel a cached step may attend with (`model.attention.CACHED_KERNEL`, compared by benchmarks/decode.py)
    gives the tokens SDPA with a mask gives, for prompts of different lengths (left padding masked out) over more
    steps than one view of the cache holds: compiled on a GPU where there is one, on a CPU eagerly and compiled
    (flex only on a GPU: a CPU step falls back to SDPA, and comparing SDPA with itself would test nothing; triton's
    kernel needs a GPU too, and on a CPU its fallback reads the cache's key span, which the mask is checked
    against). SDPA's own compiled step too: the engine's default kernel is triton's."""
    from model import attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = model.to(device)
    try:  # the module's model goes back to the CPU for the tests after, whatever happens here
        params = SamplingParams(max_new_tokens=80)
        monkeypatch.setattr(attention, "CACHED_KERNEL", "sdpa")
        expected = Engine(net, static=True).generate(prompts(), params)
        assert [len(r) for r in expected] == [80] * 4
        monkeypatch.setattr(attention, "CACHED_KERNEL", kernel)
        if device == "cpu":
            assert Engine(net, static=True).generate(prompts(), params) == expected
        assert Engine(net, compile=True).generate(prompts(), params) == expected
    finally:
        model.to("cpu")


def test_cli_captions_and_completes_in_one_batch(random_export, tmp_path):
    """`python -m infer caption|complete` on an export (weights, config, tokenizer) reached through its run
    directory: one line per input, decoded with the export's tokenizer."""
    import subprocess
    import sys

    from conftest import REPO
    from PIL import Image

    run = random_export
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / name)

    def cli(*args):
        out = subprocess.run(
            [sys.executable, "-m", "infer", *args, "--model", str(run), "--max-new-tokens", "6"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    lines = cli("caption", str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert lines[0].split("\t")[1] == lines[1].split("\t")[1]  # the same image, greedy: the same caption
    lines = cli("complete", "a red", "two", "--image", str(tmp_path / "a.png"), "--temperature", "0.8")
    assert [line.split("\t")[0] for line in lines] == ["a red", "two"]


def test_prompts_are_left_padded_field_by_field():
    """`pad_prompts`: text prompts without positions count from 0 after their padding, the padding is document 0
    and reads nothing; with an image prompt among them the text rows count on all three axes, document and image
    ids shift as the prompt had them, and each row's next position follows its own largest id."""
    from infer.engine import pad_prompts

    text = [{"tokens": torch.tensor([[11, 12, 13]])}, {"tokens": torch.tensor([[21, 22, 23, 24, 25]])}]
    batch, key_start, next_pos = pad_prompts(text, torch.device("cpu"))
    assert batch["tokens"].tolist() == [[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]]
    assert batch["positions"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert batch["doc_ids"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert (batch["image_ids"] == -1).all() and not batch["patch_mask"].any() and "patches" not in batch
    assert key_start.tolist() == [2, 0] and next_pos.tolist() == [3, 5]

    image = prompts()[1]  # an image, then text: M-RoPE positions (1, n, 3)
    n = image["tokens"].shape[1]
    batch, key_start, next_pos = pad_prompts([text[0], image], torch.device("cpu"))
    assert batch["positions"].shape == (2, n, 3)
    assert batch["positions"][0, -3:].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    assert (batch["positions"][0, :-3] == 0).all() and torch.equal(batch["positions"][1], image["positions"][0])
    assert batch["doc_ids"][0].tolist() == [0] * (n - 3) + [1] * 3
    assert torch.equal(batch["doc_ids"][1], image["doc_ids"][0] + 1)
    assert torch.equal(batch["image_ids"][1], image["image_ids"][0]) and (batch["image_ids"][0] == -1).all()
    assert torch.equal(batch["patch_mask"][1], image["patch_mask"][0]) and not batch["patch_mask"][0].any()
    assert torch.equal(batch["patches"], image["patches"])
    assert key_start.tolist() == [n - 3, 0]
    assert next_pos.tolist() == [3, int(image["positions"].max()) + 1]


def test_a_call_is_timed_by_its_parts(model):
    """`generate(..., stages=d)` adds each part's seconds to d (what `benchmarks/decode.py --stages` prints) and
    changes nothing it returns."""
    engine = Engine(model, static=True)
    params = SamplingParams(max_new_tokens=5)
    expected = engine.generate(prompts(), params)
    stages: dict = {}
    assert engine.generate(prompts(), params, stages=stages) == expected
    assert list(stages) == ["pad", "prefill", "decode", "read"] and all(v > 0 for v in stages.values())
