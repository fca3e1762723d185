"""lm-evaluation-harness on this codebase's models: the model class `fusion`, registered with lm-eval.

    python -m evals.lmeval --model fusion --model_args pretrained=DIR[,device=cuda] --batch_size 16 --tasks T ...

DIR is an export directory or a run directory (exported on the fly, as `python -m infer` does). lm-eval finds its
model classes in its own registry and has no plugin hook for others, so this module registers `fusion` and then
hands its arguments to lm-eval's own command line; from Python, `import evals.lmeval` before
`lm_eval.simple_evaluate(model="fusion", ...)`. Text tasks only: lm-eval's requests carry no images.

Scoring follows lm-eval's HF model: a request's context and continuation are tokenised together and split where the
context's own tokens end (spaces that end the context move to the continuation), so a continuation is scored with
the tokens the model would have read; sequences longer than the model's context keep their last positions. Several
requests share one packed row as separate documents (the model's document mask keeps them apart), so a batch of
short requests costs one forward.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from data.layout import layout_document
from data.packing import Row, collate, document_batch
from data.tokenizer import Tokenizer
from infer.__main__ import resolve_model
from infer.engine import Engine, SamplingParams
from model import load_pretrained


@register_model("fusion")
class FusionLM(LM):
    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str | None = None,
        batch_size: int | str = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,  # lm-eval passes it with --max_batch_size; batches here are batch_size
    ):
        super().__init__()
        export = resolve_model(pretrained)
        self.tok = Tokenizer(tokenizer or export / "tokenizer.model")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda unless told otherwise; its HF model falls back the same way
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model = load_pretrained(export, self._device).eval()
        self.engine = Engine(self.model)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)  # no autotuning: "auto" is 16
        self.max_length = int(max_length or self.model.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------------------------ scoring
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        return whole[: len(ctx)], whole[len(ctx) :]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (log-likelihood of the continuation, whether it is the greedy one)."""
        cfg, special = self.model.cfg, self.tok.special
        docs = []
        for ctx, cont in pairs:
            ids = (ctx + cont)[-(self.max_length - 1) :]  # <bos> takes one position
            doc = layout_document([ids], special, cfg.patch_size, cfg.position_scheme, eos=False)
            docs.append((doc, min(len(cont), len(ids))))
        out: list[tuple[float, bool]] = []
        for i in range(0, len(docs), self.batch_size):
            chunk = docs[i : i + self.batch_size]
            row = Row(sum(len(d) for d, _ in chunk))
            for d, _ in chunk:
                row.add(d, 0, len(d))
            batch = {k: v.to(self._device) for k, v in collate([row.arrays(special.pad, 0)]).items()}
            batch.pop("targets"), batch.pop("target_index")
            logp = F.log_softmax(self.model(**batch, return_logits=True).logits[0].float(), dim=-1)
            at = 0
            for d, n in chunk:
                end = at + len(d)  # the continuation's n tokens are the document's last n
                target = batch["tokens"][0, end - n : end]
                rows = logp[end - n - 1 : end - 1]
                out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
                at = end
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        return self._score([self._split(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """A whole text's log-likelihood, in windows of the model's context that each score only new tokens."""
        out = []
        for r in requests:
            ids, step = self.tok.encode(r.args[0]), self.max_length - 1
            windows = []
            for start in range(0, len(ids), step):
                new = ids[start : start + step]
                windows.append((ids[max(0, start + len(new) - step) : start], new))
            out.append(sum(s for s, _ in self._score(windows)))
        return out

    # --------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests with the same sampling settings are generated together, batch_size at a time, each with its own
        token limit; the text is cut at the first stop string, as lm-eval's models return it."""
        cfg, special = self.model.cfg, self.tok.special
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = r.args[1]
            sampled = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            key = (float(kw.get("temperature", 1.0)), float(kw.get("top_p", 1.0))) if sampled else (0.0, 1.0)
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for (temperature, top_p), idx in groups.items():
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k : k + self.batch_size]
                prompts, limits = [], []
                for i in chunk:
                    context, kw = requests[i].args
                    limit = int(kw.get("max_gen_toks", self.max_gen_toks))
                    keep = max(1, self.max_length - limit - 1)  # <bos>, the prompt's tail and the new tokens fit
                    ids = self.tok.encode(context)[-keep:]
                    layout = layout_document([ids], special, cfg.patch_size, cfg.position_scheme, eos=False)
                    prompts.append(document_batch(layout))
                    limits.append(limit)
                params = SamplingParams(max(limits), temperature, top_p, stop_ids=(special.eos,), seed=1234)
                for i, tokens in zip(chunk, self.engine.generate(prompts, params, limits), strict=True):
                    text = self.tok.decode(tokens)
                    until = requests[i].args[1].get("until") or []
                    for stop in [until] if isinstance(until, str) else until:
                        text = text.split(stop)[0]
                    out[i] = text
        return out


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
