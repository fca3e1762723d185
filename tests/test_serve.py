"""The OpenAI-compatible server, started for real (`python -m infer serve`) and spoken to with the official `openai`
client: replies are what the engine and the chat template give, streamed replies are the same text, concurrent
requests share batches without changing their answers, bad requests get a 400 and leave the server serving."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch
from conftest import REPO, tiny_model_config
from PIL import Image

from data.chat import ChatTokens, parse, render
from data.layout import layout_document
from data.packing import document_batch
from data.tokenizer import Tokenizer
from infer.engine import Engine, SamplingParams
from model import build_model, load_pretrained, save_pretrained


@pytest.fixture(scope="module")
def export(embedded, tmp_path_factory):
    import shutil

    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=1024, d_model=64, patch_size=8, max_image_patches=64, max_seq_len=256)
    run = tmp_path_factory.mktemp("serve") / "tiny-chat"
    (run / "checkpoints").mkdir(parents=True)
    out = save_pretrained(build_model(cfg).state_dict(), cfg, run / "export")
    shutil.copyfile(embedded / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def client(export):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "infer", "serve", "--model", str(export.parent), "--port", str(port), "--chains", "3"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.time() + 120
    while True:
        try:
            c.models.list()
            break
        except openai.APIConnectionError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start: {proc.stdout.read()}")
            time.sleep(0.3)
    yield c
    proc.terminate()
    proc.wait(timeout=30)


def ask(client, text, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": text}], **kw)


def thought(message) -> str:
    return (message.model_extra or {}).get("reasoning_content", "")


def local_reply(export, text: str, mode: str, max_tokens: int):
    """What the engine gives for the same conversation laid out by the chat template, greedy."""
    tok = Tokenizer(export / "tokenizer.model")
    model = load_pretrained(export, "cpu")
    t = ChatTokens.of(tok)
    segments, _ = render([{"role": "user", "content": [text]}], tok, mode)
    cfg = model.cfg
    prompt = document_batch(layout_document(segments, tok.special, cfg.patch_size, cfg.position_scheme, eos=False))
    (ids,) = Engine(model).generate([prompt], SamplingParams(max_tokens, stop_ids=(t.eos, t.end_answer)))
    reply = parse(ids, mode, t)
    return tok.decode(reply.thought), tok.decode(reply.answer), ids, reply.finished


def test_a_reply_is_what_the_engine_and_the_template_give(client, export):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    for effort, mode in (("low", "instant"), ("medium", "thinking")):
        r = ask(client, "a red circle above a blue square", reasoning_effort=effort)
        think, answer, ids, closed = local_reply(export, "a red circle above a blue square", mode, 12)
        assert (thought(r.choices[0].message), r.choices[0].message.content) == (think, answer)
        assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens > 10
        assert r.choices[0].finish_reason == ("stop" if closed else "length")
        assert r.model_extra["mode"] == mode


def test_streaming_sends_the_same_thought_and_answer(client):
    for effort in ("low", "medium"):
        whole = ask(client, "two green triangles", reasoning_effort=effort, max_tokens=16).choices[0]
        parts = {"reasoning_content": "", "content": ""}
        finish = None
        for chunk in ask(client, "two green triangles", reasoning_effort=effort, max_tokens=16, stream=True):
            delta = chunk.choices[0].delta
            parts["content"] += delta.content or ""
            parts["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
            finish = chunk.choices[0].finish_reason or finish
        assert parts == {"reasoning_content": thought(whole.message), "content": whole.message.content}
        assert finish == whole.finish_reason


def stats(client) -> dict:
    with urllib.request.urlopen(str(client.base_url).removesuffix("v1/") + "stats") as f:
        return json.load(f)


def test_concurrent_requests_share_batches_and_keep_their_answers(client):
    prompts = [f"scene {k}: {'circle ' * k}" for k in range(8)]
    alone = [ask(client, p).choices[0].message.content for p in prompts]
    before = stats(client)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: ask(client, p).choices[0].message.content, prompts))
    after = stats(client)
    assert together == alone
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < len(prompts)


def test_stop_strings_cut_the_answer(client):
    cut = 0
    for k in range(12):
        full = ask(client, f"shape {k}", max_tokens=24).choices[0].message.content
        if len(full.strip()) < 6:
            continue
        stop = full[3:5]
        r = ask(client, f"shape {k}", max_tokens=24, stop=[stop]).choices[0]
        assert r.message.content == full[: full.find(stop)] and r.finish_reason == "stop"
        cut += 1
    assert cut, "no prompt gave an answer long enough to cut"


def png(seed: int) -> str:
    rgb = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_images_and_contemplating(client):
    content = [{"type": "image_url", "image_url": {"url": png(0)}}, {"type": "text", "text": "what is shown?"}]
    r = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
    )
    other = [{"type": "image_url", "image_url": {"url": png(1)}}, content[1]]
    r2 = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": other}], max_tokens=8, temperature=0
    )
    assert r.usage.prompt_tokens == r2.usage.prompt_tokens > 16 + 5  # the image's patches are in the prompt
    c = ask(client, "how many circles?", reasoning_effort="high", max_tokens=10, temperature=0.8, seed=3)
    chains = thought(c.choices[0].message)
    assert re.findall(r"Chain \d+:", chains) == ["Chain 1:", "Chain 2:", "Chain 3:"]
    assert c.usage.completion_tokens > 10  # three chains and the synthesis


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"extra_body": {"mode": "pondering"}}, "unknown mode 'pondering'"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort 'extreme' is not one of"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "this model's context is 256 positions"),
        ({"max_tokens": 10_000}, "max_tokens asks 10000 more"),
        ({"temperature": -1}, "temperature must be a number in [0, 2]"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}],
                    }
                ]
            },
            "the image cannot be read",
        ),  # noqa: E501
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
                ]
            },
            "sent inline as data URLs",
        ),  # noqa: E501
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role 'wizard' is not one of"),
    ],
)
def test_bad_requests_get_a_400_with_the_reason_and_the_server_goes_on(client, kw, message):
    kw.setdefault("messages", [{"role": "user", "content": "hello"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", max_tokens=kw.pop("max_tokens", 4), **kw)
    assert message in e.value.response.json()["error"]["message"]
    assert ask(client, "still there?").choices[0].message.content is not None


def test_the_template_flags_the_assistants_writing_and_parse_splits_it(export):
    tok = Tokenizer(export / "tokenizer.model")
    t = ChatTokens.of(tok)
    image = np.zeros((3, 16, 16), dtype=np.uint8)
    convo = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [image, "count the circles"]},
        {"role": "assistant", "thought": "one circle, then another", "content": "2"},
    ]
    segments, mine = render(convo, tok)
    flat = [x for seg, m in zip(segments, mine, strict=True) if m for x in seg]
    assert flat == [
        t.think,
        *tok.encode("one circle, then another"),
        t.end_think,
        t.answer,
        *tok.encode("2"),
        t.end_answer,
    ]
    assert sum(isinstance(seg, np.ndarray) for seg in segments) == 1 and not any(
        m for seg, m in zip(segments, mine, strict=True) if isinstance(seg, np.ndarray)
    )
    prompt, _ = render(convo[:2], tok, "instant")
    assert prompt[-1] == [t.assistant, t.think, t.end_think, t.answer]
    ids = [*tok.encode("one"), t.end_think, t.answer, *tok.encode("2"), t.end_answer, *tok.encode("junk")]
    reply = parse(ids, "thinking", t)
    assert (tok.decode(reply.thought), tok.decode(reply.answer), reply.finished) == ("one", "2", True)
    assert not parse(tok.encode("still thinking"), "thinking", t).finished
