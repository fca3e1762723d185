"""The quickest way to see what a model does.

    python -m infer caption IMAGE... --model DIR [--max-new-tokens 48] [--temperature 0] [--seed 0]
    python -m infer complete "text" [--image IMG] --model DIR [--max-new-tokens 48] [--temperature 0.8] [--top-p 0.9]
    python -m infer serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--chains 4] [--name NAME]

DIR is an export directory (`python -m train.export RUN_DIR`, which writes the weights, the config and the
tokenizer) or a run directory; a run directory without an export is exported first (by running train.export, so
that this package never imports the trainer). Every prompt of one command is decoded in one batch. `serve` starts
the OpenAI-compatible chat server (infer/server.py) on the model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from data.images import ImageSpec, load_image
from data.layout import layout_document
from data.packing import document_batch
from data.tokenizer import Tokenizer
from infer.engine import Engine, SamplingParams
from model import load_pretrained

# Every character that ends a line (str.splitlines' set), written as an escape: one output line per input
ONE_LINE = {ord(c): repr(c)[1:-1] for c in "\\\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def resolve_model(path: str) -> Path:
    """An export directory: DIR itself, DIR/export, or DIR/export after exporting the run in DIR."""
    d = Path(path)
    if (d / "config.json").exists():
        return d
    if not (d / "export" / "config.json").exists() and (d / "checkpoints").is_dir():
        subprocess.run([sys.executable, "-m", "train.export", str(d)], check=True)
    if not (d / "export" / "config.json").exists():
        raise SystemExit(f"error: {d} is neither an export directory nor a run directory with a checkpoint")
    return d / "export"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=["caption", "complete", "serve"])
    ap.add_argument("inputs", nargs="*", help="caption: image files; complete: prompt texts")
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", help="complete: an image placed before the text")
    ap.add_argument("--tokenizer", help="default: DIR/tokenizer.model")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on")
    ap.add_argument("--port", type=int, default=8000, help="serve")
    ap.add_argument("--max-batch", type=int, default=32, help="serve: most requests decoded together")
    ap.add_argument("--chains", type=int, default=4, help="serve: chains a contemplating request draws")
    ap.add_argument("--name", help="serve: the model id clients ask for (default: the run directory's name)")
    args = ap.parse_args(argv)
    if args.command != "serve" and not args.inputs:
        ap.error(f"{args.command} needs at least one input")
    export = resolve_model(args.model)
    if args.command == "serve":
        from infer.server import serve

        serve(export, args.host, args.port, max_batch=args.max_batch, chains=args.chains, name=args.name)
        return 0
    tok_path = Path(args.tokenizer or export / "tokenizer.model")
    if not tok_path.exists():
        raise SystemExit(f"error: no tokenizer at {tok_path}: pass --tokenizer (exports since train.export copy it)")
    tok = Tokenizer(tok_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(export, device)
    cfg = model.cfg
    spec = ImageSpec(cfg.patch_size, cfg.max_image_patches)

    def image(path: str):
        return load_image(Path(path).read_bytes(), spec)

    if args.command == "caption":
        docs = [[image(p)] for p in args.inputs]
    else:
        prefix = [image(args.image)] if args.image else []
        docs = [[*prefix, tok.encode(text)] for text in args.inputs]
    prompts = [
        document_batch(layout_document(d, tok.special, cfg.patch_size, cfg.position_scheme, eos=False)) for d in docs
    ]
    params = SamplingParams(
        args.max_new_tokens, args.temperature, args.top_p, args.top_k, (tok.special.eos,), args.seed
    )
    for name, tokens in zip(args.inputs, Engine(model).generate(prompts, params), strict=True):
        print(f"{name}\t{tok.decode(tokens).translate(ONE_LINE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
