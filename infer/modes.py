"""The reasoning modes over the engine, shared by the server and the evaluation: a conversation laid out by the
chat template with a mode's opening, and Contemplating's two passes (N chains from one prefill, then a synthesis
whose thought lists the chains' answers)."""

from __future__ import annotations

from dataclasses import dataclass

from data.chat import ChatTokens, Reply, parse, render, synthesis_prompt
from data.layout import layout_document
from data.packing import document_batch
from infer.engine import Engine, SamplingParams


def as_prompt(segments: list, tok, cfg) -> dict:
    """Chat segments as the engine's one-row prompt (open at the end: no <eos>)."""
    return document_batch(layout_document(segments, tok.special, cfg.patch_size, cfg.position_scheme, eos=False))


def prompt(messages: list[dict], tok, mode: str, cfg) -> dict:
    """A conversation with the mode's opening, as the engine's one-row prompt."""
    return as_prompt(render(messages, tok, mode)[0], tok, cfg)


def stop_ids(t: ChatTokens) -> tuple[int, ...]:
    return t.eos, t.end_answer


@dataclass
class Contemplation:
    chains: list[Reply]  # each chain's thought and answer (thinking mode)
    chain_tokens: int  # tokens the chains wrote, all together
    synthesis_prompt: dict  # the second pass's prompt; the caller decodes it (to stream it, or in a batch)


def contemplate(engine: Engine, tok, messages: list[dict], n: int, params: SamplingParams) -> Contemplation:
    """N thinking chains forked from one prefill at the request's temperature (1.0 where it is 0: greedy chains
    would all be one), and the synthesis prompt over their answers."""
    t = ChatTokens.of(tok)
    cfg = engine.model.cfg
    chain_params = SamplingParams(
        params.max_new_tokens, params.temperature or 1.0, params.top_p, params.top_k, stop_ids(t), params.seed
    )
    ids = engine.fork(prompt(messages, tok, "thinking", cfg), n, chain_params)
    chains = [parse(c, "thinking", t) for c in ids]
    segments = synthesis_prompt(messages, [tok.decode(c.answer) for c in chains], tok)
    return Contemplation(chains, sum(map(len, ids)), as_prompt(segments, tok, cfg))
