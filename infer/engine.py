"""Batched generation with a KV cache allocated once: many prompts of different lengths (text, images,
interleaved) in one batch, or one prompt forked into N samples from a single prefill.

Prompts are one-row batches laid out like training data (`data.packing.document_batch`). A batch of them is
left-padded to one length; the padding is its own document in the prefill (the document mask keeps every prompt
from reading it) and is masked out of every cached step by the cache's `key_start`. Each new token takes the next
position after its own prompt's largest, as M-RoPE prescribes for text after an image. Tokens stay on the device;
the host reads whether every row has stopped only every `check_every` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.decode_attention import span_mask
from model.generate import KVCache, sample
from model.transformer import FusionTransformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no cut
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None


class BatchCache(KVCache):
    """A KVCache whose rows' real keys start at `key_start` (left padding before it)."""

    def __init__(self, model, batch, max_len, device, dtype, key_start: torch.Tensor):
        super().__init__(model, batch, max_len, device, dtype)
        self.key_start = key_start

    def fork(self, n: int) -> None:
        """Each prefilled row becomes n identical rows, next to each other (keys and values copied, not
        recomputed)."""
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        self.key_start = self.key_start.repeat_interleave(n)

    def key_span(self, new: int) -> tuple[torch.Tensor, torch.Tensor | int]:
        """The keys each row's step may read, [key_start[b], end): from its prompt's first to the last written."""
        return self.key_start, self.length + new

    def key_mask(self, keys: int, new: int) -> torch.Tensor:
        return span_mask(keys, *self.key_span(new))


class StaticCache(BatchCache):
    """A BatchCache whose cached steps have few shapes: a step writes its keys at a position held on the device and
    attends to the buffer's first `view` positions, masked to [key_start, written). `view` is the written length
    rounded up to a multiple of `grain` (set by the engine on the host before each step, from the step count, so
    no step reads the device to learn it), and nothing else in a step depends on a Python number that changes: each
    of the few views is captured once as a CUDA graph and replayed (`Engine(compile=True)`), and a step reads the
    keys written so far plus less than one grain of empty buffer rather than the whole buffer."""

    MAX_VIEWS = 6  # CUDA graphs (and compilations) per generate call at most: the grain doubles until it fits

    def __init__(self, model, batch, max_len, device, dtype, key_start: torch.Tensor):
        super().__init__(model, batch, max_len, device, dtype, key_start)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # the next write index, the same for every row
        self.steps = False  # set after the prefill: from then on every forward is a fixed-shape cached step
        self.max_len, self.grain = max_len, 64
        while -(-max_len // self.grain) > self.MAX_VIEWS:
            self.grain *= 2
        self.view = max_len

    def set_view(self, keys: int) -> None:
        """The next step reads `keys` positions or more: the view becomes that rounded up to the grain."""
        self.view = min(self.max_len, -(-keys // self.grain) * self.grain)

    @property
    def decoding(self) -> bool:
        return self.steps

    def advance(self, n: int) -> None:
        if self.steps:
            self.pos += n  # in place: a captured graph advances the same tensor
        else:
            super().advance(n)
            self.pos.fill_(self.length)
            self.steps = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if not self.steps:  # the prefill: written and read as the parent does
            return super().update(layer, k, v)
        at = self.pos + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, at, k)
        self.v[layer].index_copy_(2, at, v)
        return self.k[layer][:, :, : self.view], self.v[layer][:, :, : self.view]

    def key_span(self, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As the parent's, with the end a device tensor, so a captured step reads it as it is when replayed."""
        return self.key_start, self.pos + new


def _left(t: torch.Tensor, pad: int, fill) -> torch.Tensor:
    return torch.cat([torch.full((1, pad, *t.shape[2:]), fill, dtype=t.dtype, device=t.device), t], dim=1)


def pad_prompts(prompts: list[dict], device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Left-pad one-row prompts into one batch: (batch, key_start (B,), next position (B,))."""
    lengths = [p["tokens"].shape[1] for p in prompts]
    T = max(lengths)
    rows: dict[str, list] = {k: [] for k in ("tokens", "positions", "doc_ids", "image_ids", "patch_mask")}
    patches = []
    next_pos = []
    for p, n in zip(prompts, lengths, strict=True):
        pad = T - n
        tokens = p["tokens"]
        positions = p.get("positions")
        if positions is None:
            positions = torch.arange(n).view(1, n)
        doc = p.get("doc_ids")
        doc = torch.zeros_like(tokens) if doc is None else doc
        img = p.get("image_ids")
        img = torch.full_like(tokens, -1) if img is None else img
        pm = p.get("patch_mask")
        pm = torch.zeros_like(tokens, dtype=torch.bool) if pm is None else pm

        rows["tokens"].append(_left(tokens, pad, 0))
        rows["positions"].append(_left(positions, pad, 0))
        rows["doc_ids"].append(_left(doc + 1, pad, 0))  # the padding is document 0, the prompt's documents follow
        rows["image_ids"].append(_left(img, pad, -1))
        rows["patch_mask"].append(_left(pm, pad, False))
        if p.get("patches") is not None and p["patches"].shape[0]:
            patches.append(p["patches"])
        next_pos.append(int(positions.max()) + 1)
    batch = {k: torch.cat(v).to(device) for k, v in rows.items()}
    if patches:
        batch["patches"] = torch.cat(patches).to(device)
    key_start = torch.tensor([T - n for n in lengths], device=device)
    return batch, key_start, torch.tensor(next_pos, device=device)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
    """logits (B, V) -> ids (B,): model.generate's sampler (greedy at temperature 0, else temperature and top-p),
    after a top-k cut."""
    if params.top_k and params.temperature > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return sample(logits, params.temperature, params.top_p, generator)


def advance_rows(token: torch.Tensor, length: torch.Tensor, done: torch.Tensor, limit, stops) -> None:
    """In place, after a step wrote `token`: each row not yet done grows by one, and is done at a stop id or at its
    limit (rows go on decoding after that; their tokens past `length` are cut when the call returns)."""
    length += (~done).long()
    done |= torch.isin(token, stops) | (length >= limit)


class Engine:
    """`generate(prompts, params)`: one prefill over the padded batch, then one cached step per token for every
    row; `fork(prompt, n, params)`: one prefill, n samples. Returns each row's new tokens (stop id included)."""

    def __init__(
        self,
        model: FusionTransformer,
        check_every: int = 16,
        static: bool = False,
        compile: bool = False,
        block: int = 1,
    ):
        """static: decode with a StaticCache (one step shape); compile: also compile the step with CUDA graphs
        (torch.compile's reduce-overhead mode, on a GPU), which implies static. block: greedy decoding on the
        static cache (implied) runs this many steps a call (compiled: one graph replay and one host round for
        `block` tokens, where a small model's step is bound by the host's work a replay); it must divide
        check_every, so the checks for finished rows fall where they fall one step at a time."""
        if block < 1 or check_every % block:
            raise ValueError(f"block={block} must be at least 1 and divide check_every={check_every}")
        self.model, self.check_every, self.block = model.eval(), check_every, block
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.static, self.compiled = static or compile or block > 1, compile
        self.cache_class = StaticCache if self.static else BatchCache
        self.step, self.greedy_step, self.greedy_block = self._step, self._greedy_step, self._greedy_block
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # view -> `block` steps captured on one call's buffers
        self._met: set[tuple] = set()  # the shapes the compiled step has run at (so compiled before a capture)
        if compile:
            self.step = torch.compile(self._step, mode="reduce-overhead", dynamic=False, fullgraph=True)
            if block > 1 and self.device.type == "cuda":  # blocks captured by the engine (_greedy_block_graph)
                self.greedy_step = torch.compile(self._greedy_step, dynamic=False, fullgraph=True)
                self.greedy_block = self._greedy_block_graph
                self._capture_stream = torch.cuda.Stream(self.device)
            else:
                self.greedy_step = torch.compile(
                    self._greedy_step, mode="reduce-overhead", dynamic=False, fullgraph=True
                )
                self.greedy_block = torch.compile(
                    self._greedy_block, mode="reduce-overhead", dynamic=False, fullgraph=True
                )
            # one compilation per (batch, view) met: StaticCache.MAX_VIEWS views for each batch size, and dynamo's
            # limit (8 per function, across engines) fell on an H200 at the second batch size of one process
            limits = torch._dynamo.config
            limits.recompile_limit = max(limits.recompile_limit, 64)
            limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 1024)

    def _step(self, token: torch.Tensor, positions: torch.Tensor, cache: BatchCache) -> torch.Tensor:
        return self.model(token, positions=positions, cache=cache, return_logits=True).logits[:, -1]

    def _greedy_step(self, token, column, base, out, length, done, limit, stops, cache: BatchCache) -> None:
        """A greedy step with its bookkeeping on the device, all in place: the model reads `token` at each row's
        next position (`base` + `column`), its argmax becomes `token` and column `column` + 1 of `out`, and each
        row's length and stop state move on. Compiled, it is one CUDA graph a token; the other path launches the
        graph and then a dozen small kernels from the host, one by one (docs/PERFORMANCE.md: on a 20M model at
        batch 256 the GPU sat idle a third of each step)."""
        B = token.shape[0]
        logits = self.model(token.view(B, 1), positions=base + column, cache=cache, return_logits=True).logits[:, -1]
        new = logits.argmax(-1)
        column += 1
        out.index_copy_(1, column.view(1), new.view(B, 1))
        advance_rows(new, length, done, limit, stops)
        token.copy_(new)

    def _greedy_block(self, token, column, base, out, length, done, limit, stops, cache: BatchCache) -> None:
        """`block` greedy steps in one call: unrolled, so compiled it is one CUDA graph for `block` tokens."""
        for _ in range(self.block):
            self._greedy_step(token, column, base, out, length, done, limit, stops, cache)

    def _greedy_block_graph(self, token, column, base, out, length, done, limit, stops, cache) -> None:
        """`block` greedy steps as one CUDA graph of `block` compiled steps (compiled, on a GPU): captured on this
        call's buffers the first time a block meets a view, then replayed, one launch and one host round for `block`
        tokens. Unrolled and compiled under reduce-overhead instead, the block's compile grew with `block` and ran
        once per view: on an H200 one 20M engine of blocks of 4 held its benchmark call for 105 s (docs/PERFORMANCE.md);
        here the compile is one step's. A block at a shape the compiled step has not run at goes step by step, as a
        compile inside a capture would launch kernels of its own."""
        args = (token, column, base, out, length, done, limit, stops, cache)
        graph = self._graphs.get(cache.view)
        if graph is None:
            shape = (*out.shape, tuple(base.shape), stops.numel(), cache.max_len, cache.view)
            if shape not in self._met:
                for _ in range(self.block):
                    self.greedy_step(*args)
                self._met.add(shape)
                return
            graph = torch.cuda.CUDAGraph()
            stream = self._capture_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # captured, not run: the replay below runs it
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    for _ in range(self.block):
                        self.greedy_step(*args)
                finally:
                    graph.capture_end()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._graphs[cache.view] = graph  # kept once captured whole
        graph.replay()

    @torch.no_grad()
    def generate(
        self, prompts: list[dict], params: SamplingParams, max_new_tokens: list[int] | None = None, on_tokens=None
    ):
        """on_tokens(tokens, done): called after every step with each row's new token and whether the row is done
        (a host read per step: what streaming costs); it may return rows to finish now (a stop string seen)."""
        batch, key_start, next_pos = pad_prompts(prompts, self.device)
        limits = max_new_tokens or [params.max_new_tokens] * len(prompts)
        cache = self.cache_class(
            self.model, len(prompts), batch["tokens"].shape[1] + max(limits), self.device, self.dtype, key_start
        )
        logits = self.model(**batch, cache=cache, return_logits=True).logits[:, -1]
        return self._decode(logits, cache, next_pos, params, limits, batch["positions"].dim(), on_tokens)

    @torch.no_grad()
    def fork(self, prompt: dict, n: int, params: SamplingParams) -> list[list[int]]:
        """One prefill of the prompt, n samples drawn from its cache."""
        return self.fork_each([prompt], n, params)[0]

    @torch.no_grad()
    def fork_each(self, prompts: list[dict], n: int, params: SamplingParams) -> list[list[list[int]]]:
        """One prefill over all the prompts (one row each), then n samples of each decoded in one batch of
        len(prompts) x n rows: what an RL step's groups need. Returns, per prompt, its n samples."""
        batch, key_start, next_pos = pad_prompts(prompts, self.device)
        P = len(prompts)
        cache = self.cache_class(
            self.model, P, batch["tokens"].shape[1] + params.max_new_tokens, self.device, self.dtype, key_start
        )
        logits = self.model(**batch, cache=cache, return_logits=True).logits[:, -1]
        cache.fork(n)
        limits = [params.max_new_tokens] * (P * n)
        rows = self._decode(
            logits.repeat_interleave(n, 0),
            cache,
            next_pos.repeat_interleave(n),
            params,
            limits,
            batch["positions"].dim(),
        )
        return [rows[i * n : (i + 1) * n] for i in range(P)]

    def _decode(
        self, logits, cache, next_pos, params: SamplingParams, limits: list[int], pos_dims: int, on_tokens=None
    ):
        B, steps = logits.shape[0], max(limits)
        out = torch.zeros(B, steps, dtype=torch.long, device=self.device)
        limit = torch.tensor(limits, device=self.device)
        stops = torch.tensor(list(params.stop_ids) or [-1], device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        length = torch.zeros(B, dtype=torch.long, device=self.device)
        if self.compiled:  # the buffers a captured step reads and writes in place stay where they are
            for t in (*cache.k, *cache.v, cache.key_start, cache.pos):
                torch._dynamo.mark_static_address(t)
        checking, self.model.check_inputs = self.model.check_inputs, False  # its check reads the batch on the host
        try:
            if self.static and params.temperature == 0 and on_tokens is None:
                self._decode_greedy(logits, cache, next_pos, pos_dims, out, length, done, limit, stops)
            else:
                self._decode_steps(
                    logits, cache, next_pos, pos_dims, out, length, done, limit, stops, params, on_tokens
                )
        finally:
            self.model.check_inputs = checking
        lengths = length.tolist()
        return [row[:n] for row, n in zip(out.tolist(), lengths, strict=True)]

    def _decode_steps(self, logits, cache, next_pos, pos_dims, out, length, done, limit, stops, params, on_tokens):
        """`_decode`'s loop for any sampling: each token drawn on the host's call (seeded), then one model step."""
        B, steps = out.shape
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        for step in range(steps):
            token = sample_next(logits, params, generator)
            out[:, step] = token
            advance_rows(token, length, done, limit, stops)
            if on_tokens is not None:
                for row in on_tokens(token.tolist(), done.tolist()) or ():
                    done[row] = True
                if bool(done.all()):
                    break
            if step + 1 == steps or ((step + 1) % self.check_every == 0 and bool(done.all())):
                break
            if self.static:  # this step writes position length + step and reads every key before it
                cache.set_view(cache.length + step + 1)
            pos = (next_pos + step).view(B, 1)
            if pos_dims == 3:  # M-RoPE: text after the prompt takes the same next id on all three axes
                pos = pos.unsqueeze(-1).expand(B, 1, 3)
            logits = self.step(token.view(B, 1), pos.contiguous(), cache)

    def _decode_greedy(self, logits, cache, next_pos, pos_dims: int, out, length, done, limit, stops) -> None:
        """`_decode`'s loop for greedy rows of a static cache, each step one `greedy_step` (or `block` aligned steps
        in one `greedy_block`, its view wide enough for the last of them): the same tokens and the same checks
        (every row stopped, read every `check_every` steps)."""
        B, steps = out.shape
        token = logits.argmax(-1)
        out[:, 0] = token
        advance_rows(token, length, done, limit, stops)
        column = torch.zeros((), dtype=torch.long, device=self.device)  # the column last written
        base = next_pos.view(B, 1)
        if pos_dims == 3:  # M-RoPE: text after the prompt takes the same next id on all three axes
            base = base.unsqueeze(-1).expand(B, 1, 3)
        base = base.contiguous()
        if self.compiled:
            for t in (token, column, base, out, length, done, limit, stops):
                torch._dynamo.mark_static_address(t)
        self._graphs = {}  # a captured block reads and writes this call's buffers: captures last one call
        step = 1  # column `step` from the token at column step - 1
        while step < steps:
            if step % self.check_every == 0 and bool(done.all()):
                break
            k = self.block if step % self.block == 0 and step + self.block <= steps else 1  # blocks start aligned
            cache.set_view(cache.length + step + k - 1)  # the block's last step reads this many keys
            (self.greedy_block if k > 1 else self.greedy_step)(
                token, column, base, out, length, done, limit, stops, cache
            )
            step += k
