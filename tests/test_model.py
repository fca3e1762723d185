"""The early-fusion decoder: kernels agree, masks and positions do what they claim, counts match, decoding."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SPECIAL, VOCAB, packed_batch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data.layout import layout_document
from data.packing import collate, target_index
from model import (
    IGNORE,
    ConfigError,
    InputError,
    ModelConfig,
    append_text,
    build_model,
    flops_per_token,
    generate,
    param_count,
)
from model.mlp import fused_available as fused_mlp_available


def with_(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def single_doc_batch(segments, scheme="mrope", patch=4):
    doc = layout_document(segments, SPECIAL, patch, scheme)
    row = {
        "tokens": doc.tokens,
        "patch_mask": doc.is_patch,
        "positions": doc.positions,
        "doc_ids": np.zeros(len(doc), dtype=np.int64),
        "image_ids": doc.image_index,
        "targets": doc.targets,
        "patches": doc.patches,
    }
    return collate([row])


# ------------------------------------------------------------------------------------------ kernels and masks
def run_backends(cfg, batch, backends, grad: bool):
    outs = {}
    for backend in backends:
        torch.manual_seed(0)
        model = build_model(with_(cfg, attention_backend=backend)).to(batch["tokens"].device)
        with torch.set_grad_enabled(grad):
            out = model(**batch, return_logits=True)
        grads = None
        if grad:
            out.loss.backward()
            grads = model.blocks[0].attn.wqkv.weight.grad
        outs[backend] = (out.logits.detach(), grads)
    return outs


@pytest.mark.parametrize("image_mask", ["bidirectional", "causal"])
@pytest.mark.parametrize("scheme", ["mrope", "rope1d"])
def test_flex_and_sdpa_compute_the_same_function(tiny_cfg, image_mask, scheme):
    """Forward on CPU (flex has no CPU backward in torch); the CUDA test below also compares gradients."""
    cfg = with_(tiny_cfg, image_mask=image_mask, position_scheme=scheme)
    outs = run_backends(cfg, packed_batch(seed=1, scheme=scheme), ("sdpa", "flex"), grad=False)
    torch.testing.assert_close(outs["flex"][0], outs["sdpa"][0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("scheme", ["mrope", "rope1d"])
def test_interval_rule_is_the_pairwise_rule_on_packed_rows(bidirectional, scheme):
    """The kernels' rule (query t attends keys lo[t]..hi[t]) against its definition on every pair: same document,
    and causal or, with bidirectional images, both in the same image."""
    from model.attention import AttentionMask

    batch = packed_batch(seed=3, n_docs=12, seq_len=64, scheme=scheme)
    doc, img = batch["doc_ids"], batch["image_ids"]
    assert (img >= 0).any() and (doc[:, -1] > 0).all()  # images, and several documents per row
    q, k = doc[:, :, None], doc[:, None, :]
    pos = torch.arange(doc.shape[1])
    allowed = pos[None, None, :] <= pos[None, :, None]
    if bidirectional:
        allowed = allowed | ((img[:, :, None] >= 0) & (img[:, :, None] == img[:, None, :]))
    expected = (q == k) & allowed
    got = AttentionMask.build("sdpa", doc, img, bidirectional).dense[:, 0]
    assert torch.equal(got, expected)
    as_data = AttentionMask.build("sdpa", doc, img, torch.tensor(bidirectional)).dense[:, 0]  # the model's flag
    assert torch.equal(as_data, expected)


def test_ids_that_are_not_contiguous_spans_are_refused(tiny_cfg):
    """The interval rule assumes what packing guarantees; a batch that breaks it is refused, not mis-masked."""
    model = build_model(tiny_cfg)
    batch = packed_batch(seed=10)
    model(**batch)  # packed rows pass
    doc = batch["doc_ids"].clone()
    doc[0, 0] = int(doc[0].max())  # the row's last document comes back at its start
    with pytest.raises(InputError, match="a document is not one contiguous run"):
        model(**dict(batch, doc_ids=doc))
    img = batch["image_ids"]
    row = next(r for r in range(len(img)) if len(img[r][img[r] >= 0].unique()) >= 2)
    first, second = img[row][img[row] >= 0].unique()[:2].tolist()
    relabelled = img.clone()
    relabelled[row, torch.nonzero(img[row] == first)[0, 0]] = second  # one patch of the first image joins the second
    with pytest.raises(InputError, match="an image is not one contiguous run"):
        model(**dict(batch, image_ids=relabelled))
    doc = batch["doc_ids"].clone()
    doc[row, torch.nonzero(img[row] == first)[-1, 0] :] += 1  # a new document from the image's last patch on
    with pytest.raises(InputError, match="an image crossing documents"):
        model(**dict(batch, doc_ids=doc))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("T", [48, 44])
def test_flex_block_mask_matches_torchs_create_block_mask(bidirectional, T, monkeypatch):
    """The block mask built without a sort (no host wait) lists the same partial and full tiles, per query row and
    per key column, as torch's create_block_mask; T = 44 leaves a padded, partial last tile."""
    from torch.nn.attention.flex_attention import create_block_mask

    from model import attention

    batch = packed_batch(seed=2)
    assert batch["doc_ids"].shape[1] == 48
    doc, img = batch["doc_ids"][:, :T], batch["image_ids"][:, :T]
    monkeypatch.setattr(attention, "FLEX_BLOCK_SIZE", 8)
    mask = attention.AttentionMask.build("flex", doc, img, bidirectional)
    ref = create_block_mask(mask.rule(), doc.shape[0], None, T, T, device="cpu", BLOCK_SIZE=8)
    for count, index in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")] + [
        ("q_num_blocks", "q_indices"),
        ("full_q_num_blocks", "full_q_indices"),
    ]:
        ours, theirs = (getattr(m, count) for m in (mask.block, ref)), (getattr(m, index) for m in (mask.block, ref))
        (n_ours, n_ref), (i_ours, i_ref) = ours, theirs
        assert torch.equal(n_ours, n_ref), count
        for row in np.ndindex(*n_ref.shape):
            assert i_ours[row][: n_ref[row]].tolist() == sorted(i_ref[row][: n_ref[row]].tolist()), (index, row)
    assert mask.block.kv_indices.dtype == torch.int32 and int(mask.block.full_kv_num_blocks.sum()) > 0


def test_heads_of_16_get_a_finer_flex_mask_and_the_same_attention(monkeypatch):
    """The block mask's granularity goes by head dim (64 for heads of 16, whose tiles fit it; 128 otherwise), and
    attention through a mask of either granularity is the same function."""
    from torch.nn.attention.flex_attention import flex_attention

    from model import attention

    shipped = dict(attention.FLEX_BLOCK_SIZE_BY_HEAD)
    assert shipped == {16: 64} and max(attention.FLEX_KERNEL_OPTIONS[16].values()) <= 64  # the tiles fit the mask
    monkeypatch.setattr(attention, "FLEX_BLOCK_SIZE_BY_HEAD", {16: 8})  # rows of 48: 8 plays 64's part
    monkeypatch.setattr(attention, "FLEX_BLOCK_SIZE", 16)
    batch = packed_batch(seed=2)
    doc, img = batch["doc_ids"], batch["image_ids"]
    fine, coarse = (attention.AttentionMask.build("flex", doc, img, True, head_dim=d).block for d in (16, 32))
    assert fine.BLOCK_SIZE == (8, 8) and coarse.BLOCK_SIZE == (16, 16)
    q, k, v = torch.randn(3, doc.shape[0], 2, doc.shape[1], 16).unbind(0)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=fine), flex_attention(q, k, v, block_mask=coarse))


def test_flex_block_mask_keeps_a_key_tile_with_padding_partial(monkeypatch):
    """The corner the tile flags must get right: queries of a whole tile attend every real key of the last,
    padded key tile (one image filling the row, T = 14 in tiles of 8), which is still not a full tile."""
    from torch.nn.attention.flex_attention import create_block_mask

    from model import attention

    doc, img = torch.zeros(1, 14, dtype=torch.long), torch.zeros(1, 14, dtype=torch.long)
    monkeypatch.setattr(attention, "FLEX_BLOCK_SIZE", 8)
    mask = attention.AttentionMask.build("flex", doc, img, True)
    ref = create_block_mask(mask.rule(), 1, None, 14, 14, device="cpu", BLOCK_SIZE=8)
    assert mask.block.full_kv_num_blocks.tolist() == ref.full_kv_num_blocks.tolist() == [[[1, 0]]]
    assert mask.block.kv_num_blocks.tolist() == ref.kv_num_blocks.tolist() == [[[1, 2]]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward needs a CUDA device")
@pytest.mark.parametrize("image_mask", ["bidirectional", "causal"])
def test_flex_and_sdpa_gradients_agree_on_cuda(tiny_cfg, image_mask):
    batch = {k: v.cuda() for k, v in packed_batch(seed=1).items()}
    cfg = with_(tiny_cfg, d_model=64, image_mask=image_mask)  # compiled flex needs head_dim >= 16
    outs = run_backends(cfg, batch, ("sdpa", "flex"), grad=True)
    for i in (0, 1):
        torch.testing.assert_close(outs["flex"][i], outs["sdpa"][i], atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn's varlen kernel needs a CUDA device")
def test_flash_varlen_matches_sdpa(tiny_cfg):
    pytest.importorskip("flash_attn")
    batch = {k: v.cuda() for k, v in packed_batch(seed=2).items()}
    outs = run_backends(with_(tiny_cfg, image_mask="causal"), batch, ("sdpa", "flash"), grad=True)
    for i in (0, 1):  # flash-attn computes in bf16
        torch.testing.assert_close(outs["flash"][i], outs["sdpa"][i], atol=2e-2, rtol=2e-2)


def test_backend_choice_refuses_what_a_kernel_cannot_do(tiny_cfg):
    from model.attention import resolve_backend

    with pytest.raises(ConfigError, match="flash"):
        resolve_backend(with_(tiny_cfg, attention_backend="flash"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="head_dim >= 16 on CUDA; head_dim=8"):
        resolve_backend(with_(tiny_cfg, attention_backend="flex"), torch.device("cuda"))
    assert resolve_backend(with_(tiny_cfg, attention_backend="auto"), torch.device("cuda")) == "sdpa"  # head_dim 8
    assert resolve_backend(with_(tiny_cfg, attention_backend="auto"), torch.device("cpu")) == "sdpa"


def test_packed_documents_do_not_see_each_other(tiny_cfg):
    """Each document's logits in a packed row equal its logits alone: no leakage, positions restart."""
    rng = np.random.default_rng(3)
    docs = [
        [rng.integers(7, VOCAB, 5).tolist(), rng.standard_normal((3, 8, 4)).astype(np.float32), [9, 10]],
        [rng.integers(7, VOCAB, 9).tolist()],
        [rng.standard_normal((3, 4, 12)).astype(np.float32), rng.integers(7, VOCAB, 3).tolist()],
    ]
    model = build_model(tiny_cfg).eval()
    from data.packing import Packer

    packer = Packer(96, SPECIAL.pad, tiny_cfg.patch_dim)
    rows = [r for d in docs for r in packer.add(layout_document(d, SPECIAL, 4))] + packer.flush()
    assert len(rows) == 1
    packed = model(**collate(rows), return_logits=True).logits[0]
    at = 0
    for d in docs:
        alone = model(**single_doc_batch(d), return_logits=True).logits[0]
        torch.testing.assert_close(packed[at : at + len(alone)], alone, atol=1e-5, rtol=1e-5)
        at += len(alone)


def test_image_mask_bidirectional_within_image_causal_elsewhere(tiny_cfg):
    rng = np.random.default_rng(4)
    image = rng.standard_normal((3, 8, 8)).astype(np.float32)
    segs = [[20, 21], image, [30, 31, 32]]
    base = single_doc_batch(segs)
    changed = single_doc_batch([[20, 21], image.copy(), [30, 31, 32]])
    changed["patches"][-1] += 1.0  # alter the image's last patch
    first_patch = int(torch.nonzero(base["patch_mask"][0])[0])
    for mask, expect_change in (("bidirectional", True), ("causal", False)):
        model = build_model(with_(tiny_cfg, image_mask=mask)).eval()
        a = model(**base, return_logits=True).logits[0]
        b = model(**changed, return_logits=True).logits[0]
        assert torch.allclose(a[:first_patch], b[:first_patch])  # text before the image never sees it
        assert (not torch.allclose(a[first_patch], b[first_patch])) == expect_change
        assert not torch.allclose(a[-1], b[-1])  # text after the image sees all of it


def test_mrope_reduces_to_1d_rope_on_text(tiny_cfg):
    batch = packed_batch(seed=5)
    text = {k: batch[k] for k in ("tokens", "doc_ids", "targets")}
    text["positions"] = batch["positions"][..., :1].expand_as(batch["positions"]).clone()
    model = build_model(tiny_cfg).eval()
    mrope = model(**text, return_logits=True).logits
    model.cfg = with_(tiny_cfg, position_scheme="rope1d")
    from model.rope import Rotary

    model.rotary = Rotary(tiny_cfg.head_dim, model.cfg.rope_sections)
    text_1d = dict(text, positions=text["positions"][..., 0])
    rope1d = model(**text_1d, return_logits=True).logits
    torch.testing.assert_close(mrope, rope1d)
    # ...and on images the sections matter: distinct (h, w) ids change the output.
    model2 = build_model(tiny_cfg).eval()
    full = model2(**batch, return_logits=True).logits
    flat = model2(
        **dict(batch, positions=batch["positions"][..., :1].expand_as(batch["positions"])), return_logits=True
    ).logits
    assert not torch.allclose(full, flat)


def test_interleaved_mrope_gives_every_image_axis_high_frequencies(tiny_cfg):
    """Contiguous sections leave the column axis the lowest frequencies (at heads of 16 its fastest pair turns
    0.0032 rad a column); dealt in turn, its fastest turns 0.1. Text (equal t, h, w ids) is 1-D RoPE either way, and
    on images the two assignments differ."""
    from model.rope import Rotary

    contiguous, interleaved = Rotary(16, (2, 3, 3)), Rotary(16, (2, 3, 3), interleaved=True)
    assert contiguous.component.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert interleaved.component.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    fastest = [{a: max(r.inv_freq[r.component == a].tolist()) for a in range(3)} for r in (contiguous, interleaved)]
    assert fastest[0][2] == pytest.approx(10000 ** (-10 / 16)) and fastest[1][2] == pytest.approx(0.1)
    batch = packed_batch(seed=5)
    torch.manual_seed(0)
    base = build_model(tiny_cfg).eval()
    dealt = build_model(with_(tiny_cfg, mrope_interleaved=True)).eval()
    dealt.load_state_dict(base.state_dict())  # same weights: only the rotary assignment differs
    text = {k: batch[k] for k in ("tokens", "doc_ids", "targets")}
    text["positions"] = batch["positions"][..., :1].expand_as(batch["positions"]).clone()
    torch.testing.assert_close(dealt(**text, return_logits=True).logits, base(**text, return_logits=True).logits)
    assert not torch.allclose(dealt(**batch, return_logits=True).logits, base(**batch, return_logits=True).logits)
    for bad in ({"position_scheme": "rope1d"}, {"mrope_sections": (2, 3, 3)}):
        with pytest.raises(ConfigError, match="mrope_interleaved"):
            with_(tiny_cfg, mrope_interleaved=True, **bad).validate()


def test_a_second_copy_of_the_rope_module_uses_the_packages_op():
    """An HF export inlines model/rope.py into its own module (train/hf/export.py). Loaded in a process that has the
    package, the copy must not define fusion::rotary_tables again: that handed the op to the copy's functions, which
    the package's op then called after the copy was collected (a segfault in tests/test_hf.py)."""
    import gc
    import sys
    import types

    from model import rope

    copy = types.ModuleType("rope_copy")
    sys.modules["rope_copy"] = copy
    try:
        exec(compile((REPO / "model" / "rope.py").read_text(), "rope_copy", "exec"), copy.__dict__)  # noqa: S102
        assert copy.rotary_tables is torch.ops.fusion.rotary_tables  # not a second definition
        assert rope.rotary_tables is not copy.rotary_tables
        positions = torch.arange(12).reshape(1, 4, 3)
        inv_freq, component = torch.rand(6), torch.tensor([0, 0, 1, 1, 2, 2])
        want = rope.rotary_tables(positions, inv_freq, component)
        got = copy.rotary_tables(positions, inv_freq, component)
    finally:
        del sys.modules["rope_copy"]
    del copy
    gc.collect()
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    again = rope.rotary_tables(positions, inv_freq, component)  # the package's op, the copy gone
    assert all(torch.equal(a, b) for a, b in zip(want, again, strict=True))


def test_a_compiled_forward_computes_the_rotary_tables_once(tiny_cfg):
    """The angles' cos and sin are one op a forward (`model.rope.rotary_tables`), not recomputed by inductor inside
    each layer's query and key kernels and again in the backward, as they were when written inline: the generated
    code calls the op once and takes no sine anywhere."""
    from torch._inductor.utils import run_and_get_code

    from train.engine import apply_compile

    model = build_model(with_(tiny_cfg, n_layers=2, attention_backend="sdpa", image_mask="causal"))
    apply_compile(model, "default", "model")
    batch = packed_batch(seed=5)

    def step():
        model(**batch).loss.backward()

    try:
        _, code = run_and_get_code(step)
    finally:  # the compiled forward's cache entry would serve a later test's model of the same shape: gone
        torch._dynamo.reset()
    code = "\n".join(code)
    assert code.count("torch.ops.fusion.rotary_tables.default(") == 1
    assert "sin(" not in code and "sin()" not in code


# ------------------------------------------------------------------------------------------------- losses
def test_loss_is_text_cross_entropy_plus_z_loss(tiny_cfg):
    batch = packed_batch(seed=6)
    model = build_model(tiny_cfg)
    out = model(**batch, return_logits=True)
    targets = batch["targets"]
    valid = targets != IGNORE
    # Image positions and the positions before a patch are never targets.
    assert not valid[batch["patch_mask"]].any()
    assert not (targets[:, :-1][batch["patch_mask"][:, 1:]] != IGNORE).any()
    ce = F.cross_entropy(out.logits[valid], targets[valid])
    z = tiny_cfg.z_loss * torch.logsumexp(out.logits[valid], -1).square().mean()
    torch.testing.assert_close(out.text_loss, ce)
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.loss, ce + z)
    assert out.image_loss == 0


def test_output_head_at_target_positions_only_changes_nothing_but_work(tiny_cfg):
    """With the batch's target_index the head and the loss run at the positions with a target only (a fifth of a
    packed image-caption row); losses and every gradient equal the all-positions computation's."""
    batch = packed_batch(seed=6)
    listed = batch["target_index"]
    assert (listed >= 0).sum() == (batch["targets"] != IGNORE).sum() < batch["targets"].numel()
    model = build_model(with_(tiny_cfg, image_mask="causal", image_loss_weight=0.5))
    results = []
    for b in (batch, {k: v for k, v in batch.items() if k != "target_index"}):
        model.zero_grad()
        out = model(**b)
        out.loss.backward()
        results.append(([out.loss, out.text_loss, out.z_loss], [p.grad.clone() for p in model.parameters()]))
    (losses, grads), (losses_all, grads_all) = results
    torch.testing.assert_close(losses, losses_all)
    torch.testing.assert_close(grads, grads_all)
    assert all(g.abs().sum() > 0 for g in grads)


def test_inputs_padded_to_a_fixed_shape_change_nothing(tiny_cfg):
    """A captured step (train.graphed_step) feeds batches of one shape: the patches padded to one row a position
    (the padding rows are junk, ignored) and target_index padded with -1. The losses, the next-patch loss included,
    and every gradient equal those of the batch as packed; any other patch count is refused."""
    batch = packed_batch(seed=6)
    B, T = batch["tokens"].shape
    P, K = len(batch["patches"]), len(batch["target_index"])
    assert 0 < P < B * T and K < B * T
    padded = dict(batch)
    padded["patches"] = torch.cat([batch["patches"], torch.randn(B * T - P, batch["patches"].shape[1])])
    padded["target_index"] = torch.cat([batch["target_index"], torch.full((B * T - K,), -1)])
    model = build_model(with_(tiny_cfg, image_mask="causal", image_loss_weight=0.5))
    results = []
    for b in (batch, padded):
        model.zero_grad()
        out = model(**b)
        out.loss.backward()
        results.append(([out.loss, out.image_loss], [p.grad.clone() for p in model.parameters()]))
    (losses, grads), (padded_losses, padded_grads) = results
    assert losses[1] > 0
    torch.testing.assert_close(padded_losses, losses)
    torch.testing.assert_close(padded_grads, grads)
    short = {**batch, "patches": padded["patches"][: B * T - 1]}
    with pytest.raises(InputError, match=f"pad them to one per position: {B * T}"):
        model(**short)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model.cross_entropy's Triton kernel needs a CUDA device")
def test_loss_kernel_equals_autograd_on_cuda(tiny_cfg):
    """model.cross_entropy (the logits' gradient made in place in the forward): losses and gradients equal
    autograd's through the plain definition, over a vocabulary of several blocks and an upstream gradient other
    than one; and the model trains the same with it as without."""
    from model import cross_entropy

    torch.manual_seed(0)
    h = torch.randn(37, 32, device="cuda", requires_grad=True)
    w = torch.randn(20_000, 32, device="cuda", requires_grad=True)
    assert cross_entropy.MAX_BLOCK < 20_000 and 20_000 % cross_entropy.MAX_BLOCK  # several blocks, the last partial
    targets = torch.randint(0, 20_000, (37,), device="cuda")
    targets[:5] = IGNORE
    assert cross_entropy.usable(h, w)
    loss, text, z = cross_entropy.linear_cross_entropy(h, w, targets, 0.01)
    (2.5 * loss).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits, valid = h2 @ w2.T, targets != IGNORE
    ce = F.cross_entropy(logits[valid], targets[valid])
    zl = 0.01 * torch.logsumexp(logits[valid], -1).square().mean()
    (2.5 * (ce + zl)).backward()
    torch.testing.assert_close((text, z, loss), (ce, zl, ce + zl))
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    batch = {k: v.cuda() for k, v in packed_batch(seed=6).items()}
    model = build_model(with_(tiny_cfg, image_mask="causal", image_loss_weight=0.5)).cuda()
    results = []
    try:
        for on in (True, False):
            cross_entropy.ENABLED = on
            model.zero_grad()
            out = model(**batch)
            out.loss.backward()
            results.append(([out.loss, out.text_loss, out.z_loss], [p.grad.clone() for p in model.parameters()]))
    finally:
        cross_entropy.ENABLED = True
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_gradient_made_in_forward_equals_autograd(tied):
    """model.cross_entropy (torch's ops off GPUs) makes the logits' gradient in the forward pass;
    the hidden states' and the head's gradients must equal autograd's through the plain definition (cross-entropy
    + z-loss over the targets that are not IGNORE), for an upstream gradient other than one too, and with the head
    tied to the embedding table."""
    from model.cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (2, 9))
    targets[0, :3] = IGNORE
    loss, text, z = linear_cross_entropy(h, w, targets, 0.01)
    extra = w[targets.clamp(min=0)].sum() if tied else 0  # the embedding lookup's gradient adds to the head's
    (2.5 * loss + extra).backward()
    assert not text.requires_grad and not z.requires_grad  # for the logs: the gradient flows through `loss`
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits, valid = h2 @ w2.T, targets != IGNORE
    ce = F.cross_entropy(logits[valid], targets[valid])
    zl = 0.01 * torch.logsumexp(logits[valid], -1).square().mean()
    (2.5 * (ce + zl) + (w2[targets.clamp(min=0)].sum() if tied else 0)).backward()
    torch.testing.assert_close((text, z, loss), (ce, zl, ce + zl))
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with torch.no_grad():  # without autograd (as in evaluation): the same values
        torch.testing.assert_close(linear_cross_entropy(h, w, targets, 0.01), (loss, text, z))


def test_every_parameter_gets_a_gradient_without_images(tiny_cfg):
    """Data-parallel ranks must reduce the same gradients whether or not their batch holds an image."""
    model = build_model(with_(tiny_cfg, image_mask="causal", image_loss_weight=1.0))
    tokens = torch.randint(7, VOCAB, (2, 16))
    model(tokens, targets=tokens).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.patch_emb.weight.grad.abs().sum() == 0 and model.patch_head.weight.grad.abs().sum() == 0


def test_next_patch_loss_refused_with_bidirectional_mask():
    with pytest.raises(ConfigError, match="leaks"):
        ModelConfig(image_loss_weight=0.5)


def test_next_patch_loss_regresses_next_patch_of_same_image(tiny_cfg):
    cfg = with_(tiny_cfg, image_mask="causal", image_loss_weight=1.0)
    batch = packed_batch(seed=7)
    model = build_model(cfg)
    out = model(**batch)
    assert out.image_loss > 0
    torch.testing.assert_close(out.loss, out.text_loss + out.z_loss + out.image_loss)
    out.loss.backward()
    assert model.patch_head.weight.grad.abs().sum() > 0
    # A batch whose images are all one patch has no next patch to predict.
    one = single_doc_batch([[20], np.ones((3, 4, 4), np.float32), [21], np.ones((3, 4, 4), np.float32)])
    assert model(**one).image_loss == 0


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"norm_order": "post"},
        {"dropout": 0.1},
        {"qk_norm": False, "tie_embeddings": True},
        {"position_scheme": "rope1d", "image_mask": "causal", "image_loss_weight": 0.5},
    ],
)
def test_options_train(tiny_cfg, options):
    """Every option set learns: 30 AdamW steps on one batch cut the loss by more than half."""
    scheme = options.get("position_scheme", "mrope")
    batch = packed_batch(seed=8, scheme=scheme)
    model = build_model(with_(tiny_cfg, **options))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model(**batch).text_loss.item() < 0.5 * first


# --------------------------------------------------------------------------------------- sizes and counts
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"tie_embeddings": True},
        {"n_kv_heads": 1},
        {"qk_norm": False},
        {"image_mask": "causal", "image_loss_weight": 1.0},
        {"mlp_hidden": 100},
    ],
)
def test_param_count_matches_the_module(tiny_cfg, options):
    cfg = with_(tiny_cfg, **options)
    model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    assert param_count(cfg) == total
    inputs = model.tok_emb.weight.numel() + sum(p.numel() for p in model.patch_emb.parameters())
    assert param_count(cfg, embeddings=False) == total - inputs


def test_flops_per_token_matches_a_measured_count():
    """FlopCounterMode on a text forward + backward agrees with 6N + 12 L d T within 1% (norms are uncounted)."""
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, attention_backend="sdpa")
    model = build_model(cfg)
    B, T = 2, 64
    tokens = torch.randint(0, 512, (B, T))
    # SDPA's math path is plain matmuls over the full T x T grid, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, targets=tokens).loss.backward()
    measured = counter.get_total_flops() / (B * T)
    predicted = flops_per_token(cfg, seq_len=T)
    assert abs(measured - predicted) / predicted < 0.01, (measured, predicted)
    targets = torch.where(torch.rand(B, T) < 0.3, tokens, IGNORE)  # the head runs where target_index says only
    listed = torch.from_numpy(target_index(targets.numpy()))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, targets=targets, target_index=listed).loss.backward()
    measured = counter.get_total_flops() / (B * T)
    predicted = flops_per_token(cfg, seq_len=T, head_share=len(listed) / (B * T))
    assert abs(measured - predicted) / predicted < 0.01, (measured, predicted)
    assert flops_per_token(cfg, attention=False) == 6 * param_count(cfg, embeddings=False)
    tied = with_(cfg, tie_embeddings=True)
    assert flops_per_token(tied, attention=False) == 6 * (param_count(tied, embeddings=False) + 512 * 64)


def test_depth_dial_derives_every_size():
    small, big = ModelConfig.from_depth(2), ModelConfig.from_depth(12)
    assert (small.d_model, small.n_heads, small.n_layers) == (128, 2, 2)
    assert (big.d_model, big.n_heads, big.n_layers, big.head_dim) == (768, 12, 12, 64)
    counts = [param_count(ModelConfig.from_depth(d), embeddings=False) for d in range(1, 9)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    cfg = ModelConfig.from_dict({"depth": 4, "vocab_size": 1000, "n_kv_heads": 2})
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (256, 4, 2, 1000)


# ------------------------------------------------------------------------------------------------ decoding
def test_cached_decoding_matches_recomputation(tiny_cfg):
    rng = np.random.default_rng(9)
    prompt = single_doc_batch([rng.standard_normal((3, 8, 12)).astype(np.float32), [11, 12, 13]])
    prompt["tokens"] = prompt["tokens"][:, :-1]  # drop </s>: the prompt ends mid-document
    for key in ("patch_mask", "positions", "doc_ids", "image_ids", "targets"):
        prompt[key] = prompt[key][:, :-1]
    model = build_model(tiny_cfg)
    out = generate(model, prompt, max_new_tokens=8, keep_logits=True)
    assert len(out.tokens) == 8
    for i, step_logits in enumerate(out.logits):
        full = model(**append_text(prompt, out.tokens[:i]), return_logits=True).logits[0, -1]
        torch.testing.assert_close(step_logits, full, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(tiny_cfg):
    model = build_model(tiny_cfg)
    prompt = single_doc_batch([[11, 12, 13]])
    greedy = generate(model, prompt, 6).tokens
    runs = [
        generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(s)).tokens
        for s in (0, 0, 1)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # another seed, another sample (64 near-uniform choices over 6 steps)
    tiny_p = generate(model, prompt, 6, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert tiny_p.tokens == greedy
    stop = generate(model, prompt, 6, eos_id=greedy[1]).tokens
    assert stop == greedy[:2]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_value_and_the_limit(tiny_cfg):
    model = build_model(tiny_cfg)
    batch = packed_batch(seed=10)
    bad = dict(batch, tokens=batch["tokens"].clone())
    bad["tokens"][0, 3] = VOCAB + 5
    with pytest.raises(InputError, match=f"token id {VOCAB + 5} is outside the vocabulary \\[0, {VOCAB}\\)"):
        model(**bad)
    with pytest.raises(InputError, match="48"):
        model(**dict(batch, patches=batch["patches"][:, :20]))
    with pytest.raises(InputError, match="max_image_patches=2"):
        build_model(with_(tiny_cfg, max_image_patches=2))(**batch)
    with pytest.raises(InputError, match="patch_mask marks"):
        model(**dict(batch, patches=batch["patches"][1:]))
    with pytest.raises(InputError, match="max_seq_len=16"):
        build_model(with_(tiny_cfg, max_seq_len=16))(**batch)
    listed = batch["target_index"]
    n = int((listed >= 0).sum())
    for wrong in (listed + (listed >= 0), listed.roll(1), torch.where(listed == listed[n // 2], -1, listed)):
        with pytest.raises(InputError, match="target_index does not list exactly the positions"):
            model(**dict(batch, target_index=wrong))  # shifted, out of order, one dropped


def test_unknown_or_bad_options_are_refused():
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        ModelConfig.from_dict({"n_layer": 4})
    with pytest.raises(ConfigError, match="image_mask='bidi'"):
        ModelConfig(image_mask="bidi")
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        ModelConfig(n_heads=4, n_kv_heads=3)


def test_telemetry_max_attention_logit(tiny_cfg):
    model = build_model(tiny_cfg)
    batch = packed_batch(seed=11)
    out = model(**batch)
    assert model.max_attention_logit() is None and out.logit_norm is None
    model.track_attention_logits(True)
    out = model(**batch)
    model.track_attention_logits(False)  # stop recording; the value stays readable
    value = model.max_attention_logit()
    assert value is not None and torch.isfinite(value) and value > 0
    assert out.logit_norm > 0


def test_uint8_pixels_are_the_normalised_floats(tiny_cfg):
    """The loader hands over uint8 pixels; the model maps them to [-1, 1] itself, as floats given already
    normalised: same logits, same text and image losses."""
    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 256, (3, 8, 12), dtype=np.uint8), rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)]
    text = rng.integers(7, VOCAB, 6).tolist()
    as_uint8 = single_doc_batch([pixels[0], text, pixels[1], text])
    as_float = single_doc_batch([(p / 127.5 - 1).astype(np.float32) for p in pixels[:1]] + [text] +
                                [(pixels[1] / 127.5 - 1).astype(np.float32), text])  # fmt: skip
    assert as_uint8["patches"].dtype == torch.uint8 and as_float["patches"].dtype == torch.float32
    model = build_model(with_(tiny_cfg, image_loss_weight=1.0, image_mask="causal")).eval()
    a, b = model(**as_uint8, return_logits=True), model(**as_float, return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.image_loss, b.image_loss, atol=1e-5, rtol=1e-5)
    assert a.image_loss > 0


def _mlp_grads(m, x, g):
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = m(x)
    out.backward(g)
    return out, x.grad, m.w_gate_up.weight.grad, m.w_down.weight.grad


@pytest.mark.skipif(
    not (torch.cuda.is_available() and fused_mlp_available()),
    reason="QuACK's fused MLP needs quack-kernels and a GPU of sm_90 or later",
)
def test_fused_mlp_equals_torch_on_cuda(tiny_cfg, monkeypatch):
    """model.mlp with QuACK's GEMMs (SwiGLU in the gate-up epilogue, its derivative in the down projection's
    backward): output and all gradients are as close to fp32 as the same bf16 module in torch's ops, for rows that
    are not a multiple of a tile, with the unfused layout of the weights (gate rows first, then up); and a whole
    model gives the same loss, gradients and cached decoding with it as without."""
    from model import mlp

    monkeypatch.setattr(mlp, "MIN_WIDTH", 0)
    torch.manual_seed(0)
    m32 = mlp.MLP(128, 352).cuda()  # 352: hidden not a multiple of 128
    for p in m32.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m = mlp.MLP(128, 352).cuda().bfloat16()
    m.load_state_dict(m32.state_dict())
    assert m.fused
    x, g = torch.randn(2, 333, 128, device="cuda"), torch.randn(2, 333, 128, device="cuda")
    want = _mlp_grads(m32, x, g)
    monkeypatch.setattr(mlp, "FUSED", False)
    torch_bf16 = _mlp_grads(m, x.bfloat16(), g.bfloat16())
    monkeypatch.setattr(mlp, "FUSED", True)
    fused = _mlp_grads(m, x.bfloat16(), g.bfloat16())
    for a, b, ref in zip(fused, torch_bf16, want, strict=True):
        scale = ref.abs().max()
        err_fused, err_torch = (a.float() - ref).abs().max() / scale, (b.float() - ref).abs().max() / scale
        assert err_fused < max(2 * err_torch, 1e-2), (err_fused, err_torch)

    model = build_model(with_(tiny_cfg, d_model=64)).cuda().bfloat16()
    assert all(b.mlp.fused for b in model.blocks)
    batch = {k: v.cuda() for k, v in packed_batch(seed=4).items()}
    rng = np.random.default_rng(9)
    prompt = single_doc_batch([rng.standard_normal((3, 8, 12)).astype(np.float32), [11, 12, 13]])
    prompt = {k: v[:, :-1].cuda() if v.dim() > 1 and k != "patches" else v.cuda() for k, v in prompt.items()}
    runs = []
    for on in (True, False):
        monkeypatch.setattr(mlp, "FUSED", on)
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        decoded = generate(model, prompt, max_new_tokens=4, keep_logits=True)
        runs.append((loss.float(), [p.grad.float() for p in model.parameters()], torch.stack(decoded.logits).float()))
    torch.testing.assert_close(runs[0], runs[1], atol=2e-2, rtol=2e-2)


def test_the_readmes_python_snippets_run_as_written():
    """Every ```python block of the README, executed as is: a snippet a new user copies must not raise."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own code


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model.decode_attention's Triton kernel needs a CUDA device")
@pytest.mark.parametrize("span", [0, 48, 64])
def test_the_decode_kernel_is_sdpa_over_each_rows_span(span, monkeypatch):
    """model.decode_attention on a GPU: each row's one query against the keys in [key_start, end) of a cache view (a
    strided slice, as the static cache gives it), with grouped heads, spans that start inside a block and end before
    the view does: SDPA with the same mask, within bf16's rounding; also with each row's keys split over programs
    (`SPAN`, 48 not a multiple of the loop's block), parts with no real key among them."""
    from model import decode_attention as da
    from model.decode_attention import HAS_TRITON, decode_attention, reference

    monkeypatch.setattr(da, "SPAN", span)
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    for B, H, KV, keys, D in ((256, 3, 3, 320, 128), (7, 8, 2, 150, 64), (3, 4, 4, 64, 16)):
        k = torch.randn(B, KV, keys + 40, D, device="cuda", dtype=torch.bfloat16)[:, :, :keys]
        v = torch.randn(B, KV, keys + 40, D, device="cuda", dtype=torch.bfloat16)[:, :, :keys]
        q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        for end in (keys, keys - 37, 1 + keys // 3):
            start = torch.randint(0, end, (B,), device="cuda")
            start[0], start[-1] = 0, end - 1
            got = decode_attention(q, k, v, start, torch.tensor(end, device="cuda"))
            want = reference(q.float(), k.float(), v.float(), start, torch.tensor(end, device="cuda"))
            assert got.shape == (B, H, 1, D) and got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_last_logits_are_the_last_positions_of_all_of_them(tiny_cfg):
    """`last_logits=True` (a prefill's): the head runs at each row's last position only, the same logits as the last
    column of the full computation, and a loss cannot be asked for with it."""
    model = build_model(tiny_cfg).eval()
    batch = {k: v for k, v in packed_batch().items() if k not in ("targets", "target_index")}
    with torch.no_grad():
        full = model(**batch, return_logits=True).logits
        last = model(**batch, return_logits=True, last_logits=True).logits
    assert last.shape == (full.shape[0], 1, full.shape[2])
    torch.testing.assert_close(last, full[:, -1:])
    with pytest.raises(ValueError, match="last_logits"):
        model(**packed_batch(), last_logits=True)
