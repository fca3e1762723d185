"""The chat template: one layout of a conversation for fine-tuning, evaluation and serving.

A message is {"role": "system" | "user" | "assistant", "content": text or a list of parts (text, or an image as
`data.images.load_image` returns it), and for an assistant turn an optional "thought" (with "thought_given": true
when the thought is context the model reads rather than writes: a synthesis turn's list of candidates)}. Laid out
as segments for `data.layout.layout_document` (images where the parts place them):

    <bos> [<system> text] <user> parts <assistant> <think> thought </think> <answer> answer </answer> ... <eos>

A prompt ends with an open assistant turn whose opening is the mode's:
    instant        <assistant> <think> </think> <answer>   an empty thought: the model answers at once
    thinking       <assistant> <think>                     the model writes its trace, closes it, then answers
    contemplating  thinking's opening, drawn N times from one prefill; then a synthesis turn whose thought holds
                   the N candidates (`synthesis_prompt`) and whose answer is the model's
Every role and marker is a control token of the tokenizer (data.tokenizer): no text a user writes can forge one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.layout import no_loss

MODES = ("instant", "thinking", "contemplating")
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation the template cannot lay out (an unknown role or mode, a part of an unknown kind)."""


@dataclass(frozen=True)
class ChatTokens:
    system: int
    user: int
    assistant: int
    think: int
    end_think: int
    answer: int
    end_answer: int
    eos: int

    @classmethod
    def of(cls, tok) -> ChatTokens:
        ids = {name: tok.token_id(f"<{name}>") for name in ROLES}
        return cls(
            **ids,
            think=tok.token_id("<think>"),
            end_think=tok.token_id("</think>"),
            answer=tok.token_id("<answer>"),
            end_answer=tok.token_id("</answer>"),
            eos=tok.special.eos,
        )


def _parts(content) -> list:
    if isinstance(content, str | np.ndarray):
        return [content]
    if isinstance(content, list | tuple):
        return list(content)
    raise ChatError(f"a message's content is text or a list of parts, got {type(content).__name__}")


def render(messages: list[dict], tok, mode: str | None = None) -> tuple[list, list[bool]]:
    """(segments, assistant): the conversation as layout segments, each flagged when it is the assistant's own
    writing (what fine-tuning trains on). `mode`: end with that mode's open assistant turn (a prompt)."""
    t = ChatTokens.of(tok)
    segments: list = []
    assistant: list[bool] = []

    def add(segment, mine: bool = False):
        segments.append(segment)
        assistant.append(mine)

    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "assistant":
            add([t.assistant])
            thought = m.get("thought") or ""
            add([t.think, *tok.encode(thought), t.end_think, t.answer], mine=not m.get("thought_given"))
            add([*tok.encode(m.get("content") or ""), t.end_answer], mine=True)
            continue
        add([getattr(t, role)])
        for part in _parts(m.get("content", "")):
            if isinstance(part, str):
                add(tok.encode(part))
            elif isinstance(part, np.ndarray):
                add(part)
            else:
                raise ChatError(f"message {i}: a part is text or an image array, got {type(part).__name__}")
    if mode is not None:
        add(opening(mode, t))
    return segments, assistant


def training_segments(messages: list[dict], tok) -> list:
    """The conversation laid out for fine-tuning: only what the assistant wrote is a target (the rest through
    `data.layout.no_loss`: read, never predicted)."""
    segments, mine = render(messages, tok)
    return [seg if m else no_loss(seg) for seg, m in zip(segments, mine, strict=True)]


def opening(mode: str, t: ChatTokens) -> list[int]:
    if mode == "instant":
        return [t.assistant, t.think, t.end_think, t.answer]
    if mode in ("thinking", "contemplating"):
        return [t.assistant, t.think]
    raise ChatError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")


@dataclass
class Reply:
    thought: list[int]
    answer: list[int]
    finished: bool  # the answer was closed (</answer> or <eos>), not cut by the token limit


def parse(ids: list[int], mode: str, t: ChatTokens) -> Reply:
    """Split what the model wrote after a mode's opening into its thought and its answer."""
    ids = list(ids)
    thought: list[int] = []
    if mode != "instant":  # the model writes the thought, then </think> <answer>
        if t.end_think not in ids:
            return Reply(thought=[i for i in ids if i != t.eos], answer=[], finished=False)
        cut = ids.index(t.end_think)
        thought, ids = ids[:cut], ids[cut + 1 :]
        if ids[:1] == [t.answer]:
            ids = ids[1:]
    ends = [k for k, i in enumerate(ids) if i in (t.end_answer, t.eos)]
    if ends:
        return Reply(thought, ids[: ends[0]], True)
    return Reply(thought, ids, False)


def synthesis_thought(candidates: list[str]) -> str:
    return " ".join(f"Candidate {k + 1}: {c.strip()}." for k, c in enumerate(candidates))


def synthesis_prompt(messages: list[dict], candidates: list[str], tok) -> list:
    """Contemplating's second pass, as layout segments: the conversation, then an assistant turn whose thought lists
    the candidates' answers (<assistant> <think> Candidate 1: ... </think> <answer>), open for the one answer."""
    t = ChatTokens.of(tok)
    segments, _ = render(messages, tok)
    return [*segments, [t.assistant, t.think, *tok.encode(synthesis_thought(candidates)), t.end_think, t.answer]]
