"""The Hugging Face export (train.hf): transformers loads what it writes and computes what the native model computes,
on text, image+caption and interleaved rows, for both image masks and both position schemes; greedy `generate`
through transformers gives the native tokens; the stock-architecture text folder needs no remote code."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import packed_batch, tiny_model_config

from model import build_model, generate, load_pretrained, save_pretrained
from train.hf.export import ExportError, hf, hf_text


def native_export(tmp_path, **changes):
    torch.manual_seed(0)
    cfg = tiny_model_config(**changes)
    return save_pretrained(build_model(cfg).state_dict(), cfg, tmp_path / "native")


def hf_inputs(batch: dict) -> dict:
    names = {"tokens": "input_ids", "patches": "pixel_patches"}
    keep = ("tokens", "patches", "patch_mask", "positions", "doc_ids", "image_ids")
    return {names.get(k, k): batch[k] for k in keep}


@pytest.mark.parametrize("image_mask", ["bidirectional", "causal"])
@pytest.mark.parametrize("scheme", ["mrope", "rope1d"])
def test_transformers_logits_are_the_native_models(tmp_path, image_mask, scheme):
    src = native_export(tmp_path, image_mask=image_mask, position_scheme=scheme, tie_embeddings=scheme == "mrope")
    out = hf(src, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    native = load_pretrained(src)
    # packed rows of several documents: captions after images, images between text (interleaved), text alone
    batch = packed_batch(seed=1, n_docs=8, seq_len=48, scheme=scheme)
    if scheme == "rope1d":
        batch["positions"] = batch["positions"][..., 0]
    assert batch["patch_mask"].any() and (batch["doc_ids"].max(1).values > 0).all()
    with torch.no_grad():
        theirs = model(**hf_inputs(batch)).logits
        keep = ("tokens", "patches", "patch_mask", "positions", "doc_ids", "image_ids")
        ours = native(**{k: batch[k] for k in keep}, return_logits=True).logits
        text = torch.randint(7, 64, (2, 20))
        torch.testing.assert_close(model(text).logits, native(text, return_logits=True).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # a left-padded text batch: each row computes what it computes alone (padding is its own document)
    short, long = text[0, :7], text[1]
    padded = torch.stack([torch.cat([torch.zeros(13, dtype=torch.long), short]), long])
    mask = torch.stack([torch.arange(20) >= 13, torch.ones(20, dtype=torch.bool)]).long()
    with torch.no_grad():
        rows = model(padded, attention_mask=mask).logits
        alone = native(short[None], return_logits=True).logits[0]
    torch.testing.assert_close(rows[0, 13:], alone, rtol=0, atol=1e-5)
    # the round trip: load_pretrained reads the folder back, weights bit for bit
    back = load_pretrained(out).state_dict()
    assert back.keys() == native.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in native.state_dict().items())


def test_processor_tokenizer_and_greedy_generate_are_the_native_ones(random_export, tmp_path):
    from PIL import Image

    from data.tokenizer import Tokenizer

    out = hf(random_export, tmp_path / "hf")  # a run directory: its export is read
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
    ours = Tokenizer(random_export / "export" / "tokenizer.model")
    for text in ["A red  circle\tleft of\n a square.", "café ½ 漢字 🙂 ", "<img> and <s> typed as text"]:
        assert tokenizer.encode(text) == ours.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == ours.decode(ours.encode(text))
    native = load_pretrained(random_export)
    image = Image.fromarray((torch.rand(20, 28, 3) * 255).to(torch.uint8).numpy())
    for prompt in (["the scene shows"], ["a photo:", image, " it has"], [image]):
        inputs = processor(prompt)
        assert inputs["pixel_patches"].shape[0] == inputs["patch_mask"].sum()
        ours_names = {"input_ids": "tokens", "pixel_patches": "patches"}
        batch = {ours_names.get(k, k): v for k, v in inputs.items()}
        want = generate(native, batch, 12).tokens
        with torch.no_grad():
            got = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert got[0, inputs["input_ids"].shape[1] :].tolist() == want


@pytest.mark.parametrize("qk_norm,arch", [(True, "Qwen3ForCausalLM"), (False, "LlamaForCausalLM")])
def test_text_folder_is_a_stock_architecture(tmp_path, qk_norm, arch):
    src = native_export(tmp_path, qk_norm=qk_norm, tie_embeddings=not qk_norm)
    out = hf_text(src, tmp_path / "text")
    assert not list(out.glob("modeling_*.py"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(model).__name__ == arch
    text = torch.randint(7, 64, (2, 24))
    with torch.no_grad():
        theirs, ours = model(text).logits, load_pretrained(src)(text, return_logits=True).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_text_export_refuses_what_does_not_map_and_remote_code_takes_it(tmp_path):
    src = native_export(tmp_path, norm_order="post")
    with pytest.raises(ExportError, match="norm_order='post'"):
        hf_text(src, tmp_path / "text")
    assert not (tmp_path / "text").exists()  # nothing half-written
    model = transformers.AutoModelForCausalLM.from_pretrained(hf(src, tmp_path / "hf"), trust_remote_code=True)
    text = torch.randint(7, 64, (2, 24))
    with torch.no_grad():
        theirs, ours = model.eval()(text).logits, load_pretrained(src)(text, return_logits=True).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_inlining_refuses_a_name_defined_twice():
    """The generated modeling file is one namespace: a name two inlined files define would silently shadow one."""
    from train.hf.export import inline, modeling_source

    with pytest.raises(ExportError, match=r"model/config.py redefines .*'ModelConfig'"):
        inline("modeling_fusion", "model", ("config", "config"))
    source = modeling_source()
    assert "\nfrom model" not in source and "class FusionTransformer" in source and "class FusionForCausalLM" in source


def test_lm_eval_hf_backend_runs_the_text_folder(random_export, tmp_path):
    """lm-evaluation-harness's stock `hf` model (no plugin of ours) scores a local multiple-choice task on the
    --hf-text folder, and its log-likelihoods are the native model's on the same token ids."""
    import json
    import subprocess
    import sys

    import torch.nn.functional as F
    from conftest import REPO

    from data.tokenizer import Tokenizer

    out = hf_text(random_export, tmp_path / "text")
    items = [
        {"question": "how many shapes are there? answer:", "choices": [" two", " three"], "answer": 1},
        {"question": "what color is the circle?", "choices": [" red", " blue", " green"], "answer": 0},
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(
        f"task: fusion_hf_mc\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {tmp_path}/items.jsonl}}}}\n"
        'test_split: test\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "output_type: multiple_choice\ntarget_delimiter: ''\nmetric_list: [{metric: acc}]\n"
    )
    args = ["--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True,dtype=float32", "--device"]
    args += ["cpu", "--tasks", "fusion_hf_mc", "--include_path", str(tmp_path / "tasks"), "--log_samples"]
    args += ["--output_path", str(tmp_path / "results"), "--batch_size", "2"]
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "lm_eval", *args], cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (samples,) = (tmp_path / "results").rglob("samples_fusion_hf_mc_*.jsonl")
    tok, native = Tokenizer(random_export / "export" / "tokenizer.model"), load_pretrained(random_export)
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(logged) == len(items)
    for sample in logged:
        item = items[sample["doc_id"]]
        for choice, ((ll, _),) in zip(item["choices"], sample["resps"], strict=True):
            context = tok.encode(item["question"])  # lm-eval encodes the pair whole and splits it at the context
            ids = tok.encode(item["question"] + choice)
            with torch.no_grad():
                logp = F.log_softmax(native(torch.tensor([ids]), return_logits=True).logits[0], -1)
            want = sum(float(logp[j - 1, ids[j]]) for j in range(len(context), len(ids)))
            assert float(ll) == pytest.approx(want, abs=1e-3)
