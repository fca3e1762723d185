"""An OpenAI-compatible chat server over the engine: `python -m infer serve --model DIR [--port 8000]`.

`POST /v1/chat/completions` takes the OpenAI chat request (messages with text and `image_url` parts as data URLs,
`max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`, `stream`) and a mode, chosen by
`reasoning_effort` (none, minimal, low: instant; medium: thinking; high: contemplating) or named by the extra field
`mode`. The thought comes back apart from the answer, as `message.reasoning_content` (and `delta.reasoning_content`
when streaming), the field other open servers use for it. `GET /v1/models` lists the one model; `GET /stats` says
how the engine batched.

Requests are queued for one worker thread that owns the model: it takes every waiting request with the same
sampling settings into one `Engine.generate` batch (prefill once, decode together), so concurrent clients share the
decode steps. Contemplating requests run alone: N chains forked from one prefill (`Engine.fork`), then the synthesis
pass (data.chat). A bad request (an unreadable image, an unknown mode, a prompt past the context) is answered 400
with a message before it reaches the queue, so it never disturbs the batch it would have joined.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from data.chat import MODES, ChatError, ChatTokens, parse
from data.images import ImageSpec, Skip, load_image
from infer.engine import Engine, SamplingParams
from infer.modes import contemplate, prompt, stop_ids

EFFORT = {"none": "instant", "minimal": "instant", "low": "instant", "medium": "thinking", "high": "contemplating"}


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    """One request on its way through the worker; `events` carries (field, text) deltas and a final ("end", info)."""

    messages: list[dict]
    prompt: dict
    prompt_tokens: int
    mode: str
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    @property
    def batch_key(self):
        return self.params.temperature, self.params.top_p, self.params.top_k, self.params.seed


class Text:
    """Token ids of one reply as they come, to text deltas of its thought and its answer (stop strings applied)."""

    def __init__(self, job: Job, tok, t: ChatTokens, mode: str | None = None):
        self.job, self.tok, self.t, self.mode = job, tok, t, mode or job.mode
        self.ids: list[int] = []
        self.sent = {"reasoning_content": "", "content": ""}
        self.texts = dict(self.sent)
        self.finished = None  # the finish reason once known

    def push(self, token: int) -> bool:
        """Add a token, send what it makes readable; True once the reply is finished."""
        self.ids.append(token)
        reply = parse(self.ids, self.mode, self.t)
        self.texts = {"reasoning_content": self.tok.decode(reply.thought), "content": self.tok.decode(reply.answer)}
        cut = [i for i in (self.texts["content"].find(s) for s in self.job.stop) if i >= 0]
        if cut:
            self.texts["content"] = self.texts["content"][: min(cut)]
            self.finished = "stop"
        elif reply.finished:
            self.finished = "stop"
        self._send(final=self.finished is not None)
        return self.finished is not None

    def _send(self, final: bool) -> None:
        """Deltas of what is readable: a trailing U+FFFD is a character whose bytes are still coming (held back
        until the reply ends). A text that no longer extends what was sent is not sent; `end` carries the truth."""
        for name, text in self.texts.items():
            text = text if final else text.rstrip("\ufffd")
            if text.startswith(self.sent[name]) and len(text) > len(self.sent[name]):
                self.job.emit(name, text[len(self.sent[name]) :])
                self.sent[name] = text

    def end(self, completion_tokens: int) -> None:
        self._send(final=True)
        reason = self.finished or "length"
        self.job.emit("end", {"finish_reason": reason, "completion_tokens": completion_tokens, **self.texts})


class ChatService:
    """The model, its tokenizer and the worker that batches requests into the engine."""

    def __init__(self, model, tok, name: str, max_batch: int = 32, chains: int = 4, window_s: float = 0.01):
        self.model, self.tok, self.name = model, tok, name
        self.t = ChatTokens.of(tok)
        self.engine = Engine(model)
        self.max_batch, self.chains, self.window_s = max_batch, chains, window_s
        self.spec = ImageSpec(model.cfg.patch_size, model.cfg.max_image_patches)
        self.pending: deque[Job] = deque()
        self.ready = threading.Condition()
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "generated_tokens": 0}
        threading.Thread(target=self._work, daemon=True, name="engine").start()

    # ------------------------------------------------------------------------------------------------ requests
    def job(self, body: dict, loop) -> Job:
        """A request checked and laid out, or BadRequest saying what is wrong with it."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        mode = body.get("mode")
        effort = body.get("reasoning_effort")
        if mode is None:
            if effort is not None and effort not in EFFORT:
                raise BadRequest(f"reasoning_effort {effort!r} is not one of {', '.join(EFFORT)}", "reasoning_effort")
            mode = EFFORT.get(effort, "instant")
        if mode not in MODES:
            raise BadRequest(f"unknown mode {mode!r}: one of {', '.join(MODES)}", "mode")
        if body.get("n", 1) != 1:
            raise BadRequest("n must be 1 (several samples and their synthesis: mode 'contemplating')", "n")
        messages = self._messages(body.get("messages"))
        try:
            batch = prompt(messages, self.tok, mode, self.model.cfg)
        except ChatError as e:
            raise BadRequest(str(e), "messages") from e
        n, context = batch["tokens"].shape[1], self.model.cfg.max_seq_len
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        if asked is not None and (not isinstance(asked, int) or asked < 1):
            raise BadRequest(f"max_tokens must be a positive integer, got {asked!r}", "max_tokens")
        if n >= context or (asked is not None and n + asked > context):
            raise BadRequest(
                f"this model's context is {context} positions; the prompt takes {n}"
                + (f" and max_tokens asks {asked} more" if asked is not None else ""),
                "messages",
            )
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        for key, value, lo, hi in (("temperature", temperature, 0.0, 2.0), ("top_p", top_p, 0.0, 1.0)):
            if not isinstance(value, int | float) or not lo <= value <= hi:
                raise BadRequest(f"{key} must be a number in [{lo:g}, {hi:g}], got {value!r}", key)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise BadRequest("stop must be a string or a list of up to 4 non-empty strings", "stop")
        seed = body.get("seed")
        max_tokens = asked if asked is not None else context - n
        params = SamplingParams(max_tokens, float(temperature), float(top_p), 0, stop_ids(self.t), seed)
        return Job(messages, batch, n, mode, params, max_tokens, stop, loop)

    def _messages(self, raw) -> list[dict]:
        if not isinstance(raw, list) or not raw:
            raise BadRequest("messages must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise BadRequest(f"messages[{i}] must be an object", "messages")
            role = {"developer": "system"}.get(m.get("role"), m.get("role"))
            content = m.get("content") or ""
            parts = [content] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise BadRequest(f"messages[{i}].content must be a string or a list of parts", "messages")
            items = []
            for j, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else "text" if isinstance(part, str) else None
                if kind == "text":
                    items.append(part if isinstance(part, str) else str(part.get("text", "")))
                elif kind == "image_url":
                    items.append(self._image(part.get("image_url"), f"messages[{i}].content[{j}]"))
                else:
                    raise BadRequest(f"messages[{i}].content[{j}]: a part is text or image_url", "messages")
            entry = {"role": role, "content": items}
            if role == "assistant" and m.get("reasoning_content"):
                entry["thought"] = m["reasoning_content"]
            if role == "assistant":
                entry["content"] = "".join(x for x in items if isinstance(x, str))
            out.append(entry)
        return out

    def _image(self, ref, where: str):
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
            raise BadRequest(f"{where}: images are sent inline as data URLs (data:image/png;base64,...)", "messages")
        header, payload = url.split(",", 1)
        try:
            data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else payload.encode()
            return load_image(data, self.spec)
        except (Skip, binascii.Error, ValueError) as e:
            raise BadRequest(f"{where}: the image cannot be read ({e})", "messages") from e

    def submit(self, job: Job) -> None:
        with self.ready:
            self.pending.append(job)
            self.stats["requests"] += 1
            self.ready.notify()

    # ------------------------------------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self.ready:
                while not self.pending:
                    self.ready.wait()
            time.sleep(self.window_s)  # let requests that arrive together share the batch
            with self.ready:
                first = self.pending.popleft()
                batch = [first]
                if first.mode != "contemplating":
                    for job in list(self.pending):
                        if len(batch) >= self.max_batch:
                            break
                        if job.mode != "contemplating" and job.batch_key == first.batch_key:
                            self.pending.remove(job)
                            batch.append(job)
            try:
                with torch.inference_mode():
                    self._contemplate(first) if first.mode == "contemplating" else self._generate(batch)
            except Exception as e:  # noqa: BLE001 - the requests fail, the server stays up
                for job in batch:
                    job.emit("error", f"{type(e).__name__}: {e}")

    def _record(self, rows: int, tokens: int) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
        self.stats["generated_tokens"] += tokens

    def _generate(self, jobs: list[Job]) -> None:
        texts = [Text(job, self.tok, self.t) for job in jobs]

        on_tokens = _streamer(texts)
        out = self.engine.generate(
            [j.prompt for j in jobs], jobs[0].params, [j.max_tokens for j in jobs], on_tokens=on_tokens
        )
        self._record(len(jobs), sum(map(len, out)))
        for text, ids in zip(texts, out, strict=True):
            text.end(len(ids))

    def _contemplate(self, job: Job) -> None:
        """The chains (infer.modes.contemplate), sent whole as the thought; the synthesis, streamed as the answer."""
        c = contemplate(self.engine, self.tok, job.messages, self.chains, job.params)
        thoughts = "\n".join(f"Chain {k + 1}: {self.tok.decode(r.thought)}" for k, r in enumerate(c.chains))
        job.emit("reasoning_content", thoughts)
        room = self.model.cfg.max_seq_len - c.synthesis_prompt["tokens"].shape[1]
        if room < 1:
            raise BadRequest("the synthesis prompt leaves no room in the context")
        text = Text(job, self.tok, self.t, mode="instant")
        text.sent["reasoning_content"] = thoughts  # sent above, whole
        p = job.params
        out = self.engine.generate(
            [c.synthesis_prompt],
            SamplingParams(min(job.max_tokens, room), p.temperature, p.top_p, 0, p.stop_ids, p.seed),
            on_tokens=_streamer([text]),
        )
        used = c.chain_tokens + len(out[0])
        self._record(self.chains, used)
        text.texts["reasoning_content"] = thoughts
        text.end(used)


def _streamer(texts: list[Text]):
    """The engine's per-step callback for a batch of replies: each row's new token goes to its Text until the reply
    is finished (its stop token pushed too, so a closed answer reads as "stop"); rows finished by a stop string are
    returned for the engine to stop decoding."""
    over = [False] * len(texts)

    def on_tokens(tokens, done):
        stop = []
        for i, (text, token) in enumerate(zip(texts, tokens, strict=True)):
            if over[i]:
                continue
            if text.push(token) or done[i]:
                over[i] = True
                stop += [] if done[i] else [i]
        return stop

    return on_tokens


def create_app(service: ChatService):
    app = FastAPI(title="fusion chat")

    def error(status: int, message: str, param=None, kind="invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0, "owned_by": "fusion"}]}

    @app.get("/stats")
    def stats():
        return service.stats

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body is not JSON")
        try:
            job = service.job(body, asyncio.get_running_loop())
        except BadRequest as e:
            return error(400, str(e), e.param)
        service.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": service.name}
        if body.get("stream"):
            return StreamingResponse(_stream(job, head), media_type="text/event-stream")
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                return error(500, value, kind="server_error")
            if kind == "end":
                break
        message = {"role": "assistant", "content": value["content"], "reasoning_content": value["reasoning_content"]}
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": value["finish_reason"]}],
            "usage": _usage(job, value),
            "mode": job.mode,
        }

    return app


def _usage(job: Job, end: dict) -> dict:
    done = end["completion_tokens"]
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": done, "total_tokens": job.prompt_tokens + done}


async def _stream(job: Job, head: dict):
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {
            **head,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps({**body, **extra})}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while True:
        kind, value = await job.events.get()
        if kind == "error":
            yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
            break
        if kind == "end":
            yield chunk({}, value["finish_reason"], usage=_usage(job, value))
            break
        yield chunk({kind: value})
    yield "data: [DONE]\n\n"


def serve(export, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve an export directory (`python -m infer serve` resolves a run directory to one) until interrupted."""
    import uvicorn

    from data.tokenizer import Tokenizer
    from model import load_pretrained

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(export, device)
    name = options.pop("name", None) or export.parent.name
    service = ChatService(model, Tokenizer(export / "tokenizer.model"), name, **options)
    print(f"serving {export} as '{service.name}' on http://{host}:{port}/v1 ({device})", flush=True)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
