"""Batched generation with a KV cache allocated once: many prompts of different lengths (text, images,
interleaved) in one batch, or one prompt forked into N samples from a single prefill.

Prompts are one-row batches laid out like training data (`data.packing.document_batch`). A batch of them is
left-padded to one length; the padding is its own document in the prefill (the document mask keeps every prompt
from reading it) and is masked out of every cached step by the cache's `key_start`. Each new token takes the next
position after its own prompt's largest, as M-RoPE prescribes for text after an image. Tokens stay on the device;
the host reads whether every row has stopped only every `check_every` steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

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


@dataclass
class Held:
    """A static generate call's cache and decode buffers, kept for the next call of the same shapes, and the graphs
    captured on those buffers (view -> graph), which replay as long as the buffers stay."""

    shape: tuple  # (batch, max_len): the cache's
    cache: StaticCache
    buffers_shape: tuple | None = None  # (batch, steps, stop ids, position dims)
    buffers: tuple | None = None
    graphs: dict = field(default_factory=dict)


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

    def reset(self, key_start: torch.Tensor) -> None:
        """Empty again for a new batch of the same shape, its buffers kept where they are (so are the graphs captured
        on them): the next forward is a prefill; old keys past it are never read (each step reads [key_start, end))."""
        self.key_start.copy_(key_start)
        self.length, self.steps, self.view = 0, False, self.max_len
        self.pos.zero_()

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


def pad_prompts(prompts: list[dict], device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Left-pad one-row prompts into one batch: (batch, key_start (B,), next position (B,)). A field no prompt has is
    made from the lengths in a few whole-batch ops and the others are padded by `pad_sequence`, each copied to the
    device once: on an H200's host 256 text prompts took 6.6 ms laid out a slice at a time (docs/PERFORMANCE.md)."""
    sizes = [p["tokens"].shape[1] for p in prompts]
    lengths = torch.tensor(sizes)
    B, T = len(prompts), max(sizes)
    pad = (T - lengths).view(B, 1)
    real = torch.arange(T) >= pad  # (B, T): the prompt's own positions, after its padding

    def left(key: str, fill, default) -> torch.Tensor | None:
        """Each prompt's `key` (`default(i)` where it has none) left-padded with `fill`; None when no prompt has it."""
        if all(p.get(key) is None for p in prompts):
            return None
        rows = [p[key][0] if p.get(key) is not None else default(i) for i, p in enumerate(prompts)]
        return pad_sequence(rows, batch_first=True, padding_value=fill, padding_side="left")

    given = next((p["positions"] for p in prompts if p.get("positions") is not None), None)
    if given is None:
        positions, next_pos = (torch.arange(T) - pad).clamp(min=0), lengths
    else:  # text-only prompts among them count 0, 1, ... on every axis
        axes = given.shape[2:]

        def ramp(i: int) -> torch.Tensor:
            return torch.arange(sizes[i], dtype=given.dtype).view(-1, *[1] * len(axes)).expand(-1, *axes)

        positions = left("positions", 0, ramp)
        next_pos = positions.flatten(1).amax(1) + 1  # the padding's zeros never exceed a prompt's ids
    doc_ids = left("doc_ids", -1, lambda i: torch.zeros(sizes[i], dtype=torch.long))
    image_ids = left("image_ids", -1, lambda i: torch.full((sizes[i],), -1, dtype=torch.long))
    patch_mask = left("patch_mask", False, lambda i: torch.zeros(sizes[i], dtype=torch.bool))
    fields = {
        "tokens": left("tokens", 0, None),
        "positions": positions,
        "doc_ids": real.long() if doc_ids is None else doc_ids + 1,  # the padding is document 0, the prompts' follow
        "image_ids": torch.full((B, T), -1, dtype=torch.long) if image_ids is None else image_ids,
        "patch_mask": torch.zeros(B, T, dtype=torch.bool) if patch_mask is None else patch_mask,
    }
    batch = {k: v.to(device) for k, v in fields.items()}
    patches = [p["patches"] for p in prompts if p.get("patches") is not None and p["patches"].shape[0]]
    if patches:
        batch["patches"] = torch.cat(patches).to(device)
    return batch, pad.view(B).to(device), next_pos.to(device)


class StageClock:
    """Seconds per stage of a generate call, into a dict, the device synchronized at each mark (so a timed call
    overlaps less than an untimed one); with no dict it does nothing."""

    def __init__(self, into: dict | None, device: torch.device):
        self.into, self.device, self.t = into, device, time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self.into is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.into[stage] = self.into.get(stage, 0.0) + now - self.t
        self.t = now


def _base(next_pos: torch.Tensor, pos_dims: int) -> torch.Tensor:
    """(B, 1) each row's next position, or (B, 1, 3) for M-RoPE, where text after the prompt takes the same next id
    on all three axes."""
    base = next_pos.view(-1, 1)
    if pos_dims == 3:
        base = base.unsqueeze(-1).expand(-1, 1, 3)
    return base.contiguous()


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
        autotune: bool = False,
    ):
        """static: decode with a StaticCache (one step shape); compile: also compile the step with CUDA graphs
        (torch.compile's reduce-overhead mode, on a GPU), which implies static, and on a GPU the prefill. block:
        greedy decoding on the static cache (implied) runs this many steps a call (compiled: one graph replay and
        one host round for `block` tokens, where a small model's step is bound by the host's work a replay); it
        must divide check_every, so the checks for finished rows fall where they fall one step at a time.
        autotune (with compile): inductor's max-autotune, the step's matmuls timed against its Triton templates on
        first use and their neighbours fused into them (a longer first compile)."""
        if block < 1 or check_every % block:
            raise ValueError(f"block={block} must be at least 1 and divide check_every={check_every}")
        self.model, self.check_every, self.block = model.eval(), check_every, block
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.static, self.compiled = static or compile or block > 1, compile
        self.cache_class = StaticCache if self.static else BatchCache
        self.step, self.greedy_step, self.greedy_block = self._step, self._greedy_step, self._greedy_block
        self._compiled_prefill = None  # on a GPU with compile=True: the prefill for batches of more than one row
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # view -> `block` steps captured on the held buffers
        # the static cache and decode buffers of the last generate call, kept for the next call of the same shapes:
        # a server's batches of one shape allocate once, and the step's CUDA graphs, captured on these buffers,
        # replay from call to call instead of being captured again each call
        self._held: Held | None = None
        self._met: set[tuple] = set()  # the shapes the compiled step has run at (so compiled before a capture)
        if compile:
            graphs = "max-autotune" if autotune else "reduce-overhead"  # both capture CUDA graphs
            if self.device.type == "cuda":  # where launching its few hundred ops one by one is the prefill's cost:
                # most of a 20M prefill's 9 ms at batch 256 on an H200 (docs/PERFORMANCE.md); on a CPU the ops'
                # own work is, and a compile would not pay for itself. No graphs: its shapes vary from call to call
                self._compiled_prefill = torch.compile(self._prefill, dynamic=False)
            self.step = torch.compile(self._step, mode=graphs, dynamic=False, fullgraph=True)
            if block > 1 and self.device.type == "cuda":  # blocks captured by the engine (_greedy_block_graph)
                mode = "max-autotune-no-cudagraphs" if autotune else None
                self.greedy_step = torch.compile(self._greedy_step, mode=mode, dynamic=False, fullgraph=True)
                self.greedy_block = self._greedy_block_graph
                self._capture_stream = torch.cuda.Stream(self.device)
            else:
                self.greedy_step = torch.compile(self._greedy_step, mode=graphs, dynamic=False, fullgraph=True)
                self.greedy_block = torch.compile(self._greedy_block, mode=graphs, dynamic=False, fullgraph=True)
            # one compilation per (batch, view) met: StaticCache.MAX_VIEWS views for each batch size, and dynamo's
            # limit (8 per function, across engines) fell on an H200 at the second batch size of one process
            limits = torch._dynamo.config
            limits.recompile_limit = max(limits.recompile_limit, 64)
            limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 1024)

    def _prefill(self, batch: dict, cache: BatchCache) -> torch.Tensor:
        """The padded prompts through the model, their keys and values into the cache: (B, V) next-token logits."""
        return self.model(**batch, cache=cache, return_logits=True, last_logits=True).logits[:, -1]

    def prefill(self, batch: dict, cache: BatchCache) -> torch.Tensor:
        """`_prefill`, compiled where the engine compiled it, except for a batch of one row: inductor's flex-attention
        lowering failed on one (torch 2.11 on an H200: "convert FlexibleLayout to FixedLayout first"), and one
        row's prefill is a small share of its call."""
        compiled = self._compiled_prefill is not None and batch["tokens"].shape[0] > 1
        return (self._compiled_prefill if compiled else self._prefill)(batch, cache)

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
        self,
        prompts: list[dict],
        params: SamplingParams,
        max_new_tokens: list[int] | None = None,
        on_tokens=None,
        stages: dict | None = None,
    ):
        """on_tokens(tokens, done): called after every step with each row's new token and whether the row is done
        (a host read per step: what streaming costs); it may return rows to finish now (a stop string seen).
        stages: a dict to add the seconds of each part of the call to (pad: the prompts laid out and copied in;
        prefill; decode; read: the tokens read back), the device synchronized between them."""
        clock = StageClock(stages, self.device)
        batch, key_start, next_pos = pad_prompts(prompts, self.device)
        limits = max_new_tokens or [params.max_new_tokens] * len(prompts)
        clock("pad")
        cache = self._cache(len(prompts), batch["tokens"].shape[1] + max(limits), key_start)
        logits = self.prefill(batch, cache)
        clock("prefill")
        return self._decode(logits, cache, next_pos, params, limits, batch["positions"].dim(), on_tokens, clock)

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
        logits = self.prefill(batch, cache)
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

    def release(self) -> None:
        """Drop the held cache, buffers and graphs (their GPU memory): the next call allocates and captures anew."""
        self._held, self._graphs = None, {}

    def _cache(self, batch: int, max_len: int, key_start: torch.Tensor) -> BatchCache:
        """A cache for a generate call: on the static cache, the held one when the last call's had this shape."""
        key = (batch, max_len)
        if self._held is not None and self._held.shape == key:
            self._held.cache.reset(key_start)
            return self._held.cache
        cache = self.cache_class(self.model, batch, max_len, self.device, self.dtype, key_start)
        if self.static:
            self._held = Held(key, cache)  # graphs on the old buffers go with them
        return cache

    def _buffers(self, cache, limits: list[int], stop_ids, pos_dims: int, next_pos: torch.Tensor) -> tuple:
        """The decode's device state (out, limit, stops, done, length, token, column, base), set for this call: the
        held cache's buffers are reused in place when their shapes match (and the graphs captured on them stay)."""
        B, steps, d = len(limits), max(limits), self.device
        stops_ = list(stop_ids) or [-1]
        key = (B, steps, len(stops_), pos_dims)
        held = self._held is not None and cache is self._held.cache
        if held and self._held.buffers_shape == key:
            bufs, self._graphs = self._held.buffers, self._held.graphs
            out, limit, stops, done, length, token, column, base = bufs
            out.zero_(), done.zero_(), length.zero_(), column.zero_()
            limit.copy_(torch.tensor(limits)), stops.copy_(torch.tensor(stops_))
            base.copy_(_base(next_pos, pos_dims))
            return bufs
        bufs = (
            torch.zeros(B, steps, dtype=torch.long, device=d),
            torch.tensor(limits, device=d),
            torch.tensor(stops_, device=d),
            torch.zeros(B, dtype=torch.bool, device=d),
            torch.zeros(B, dtype=torch.long, device=d),
            torch.zeros(B, dtype=torch.long, device=d),  # token: the last token of each row
            torch.zeros((), dtype=torch.long, device=d),  # column: the column of `out` last written
            _base(next_pos, pos_dims),
        )
        self._graphs = {}  # graphs are captured on one set of buffers: these start with none
        if held:
            self._held.buffers_shape, self._held.buffers, self._held.graphs = key, bufs, self._graphs
        return bufs

    def _decode(
        self,
        logits,
        cache,
        next_pos,
        params: SamplingParams,
        limits: list[int],
        pos_dims: int,
        on_tokens=None,
        clock: StageClock | None = None,
    ):
        clock = clock or StageClock(None, self.device)
        out, limit, stops, done, length, token, column, base = bufs = self._buffers(
            cache, limits, params.stop_ids, pos_dims, next_pos
        )
        if self.compiled:  # the buffers a captured step reads and writes in place stay where they are
            for t in (*cache.k, *cache.v, cache.key_start, cache.pos, *bufs):
                torch._dynamo.mark_static_address(t)
        checking, self.model.check_inputs = self.model.check_inputs, False  # its check reads the batch on the host
        try:
            if self.static and params.temperature == 0 and on_tokens is None:
                self._decode_greedy(logits, cache, token, column, base, out, length, done, limit, stops)
            else:
                self._decode_steps(
                    logits, cache, next_pos, pos_dims, out, length, done, limit, stops, params, on_tokens
                )
        finally:
            self.model.check_inputs = checking
        clock("decode")
        lengths = length.tolist()
        rows = [row[:n] for row, n in zip(out.tolist(), lengths, strict=True)]
        clock("read")
        return rows

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
            logits = self.step(token.view(B, 1), _base(next_pos + step, pos_dims), cache)

    def _decode_greedy(self, logits, cache, token, column, base, out, length, done, limit, stops) -> None:
        """`_decode`'s loop for greedy rows of a static cache, each step one `greedy_step` (or `block` aligned steps
        in one `greedy_block`, its view wide enough for the last of them): the same tokens and the same checks
        (every row stopped, read every `check_every` steps)."""
        B, steps = out.shape
        token.copy_(logits.argmax(-1))
        out[:, 0] = token
        advance_rows(token, length, done, limit, stops)
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
