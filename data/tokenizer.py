"""A sentencepiece tokenizer with the special tokens the model needs at fixed, reserved ids.

Specials are sentencepiece *control* symbols: encoding text never produces them (a caption that contains the
string "<img>" stays text), and they sit at ids 0..N right after pad/unk/bos/eos: the image markers, the reasoning
markers and the chat roles (data.chat), then spare <reserved_k> slots. The roles took the first three spare slots'
places (same ids), so a tokenizer built before them still loads: its `<reserved_0..2>` answer for the roles.

    python -m data.tokenizer train --out tok.model --vocab-size 4096 [--type bpe|unigram] FILES_OR_SHARDS...
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from data.layout import SpecialIds

IMAGE_TOKENS = ["<img>", "</img>", "<row>", "<patch>"]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
ROLE_TOKENS = ["<system>", "<user>", "<assistant>"]
SPARE = [f"<reserved_{i}>" for i in range(len(ROLE_TOKENS), 8)]  # the spare slots keep their names and ids
CONTROL_SYMBOLS = IMAGE_TOKENS + REASONING_TOKENS + ROLE_TOKENS + SPARE
# a role's name in tokenizers built before the roles were named: the spare slot whose id it took
FORMER_NAMES = {role: f"<reserved_{i}>" for i, role in enumerate(ROLE_TOKENS)}


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.aliases = {}
        if all(self.sp.piece_to_id(s) == self.sp.unk_id() for s in ROLE_TOKENS):  # built before the roles had names
            self.aliases = dict(FORMER_NAMES)
        names = [self.aliases.get(s, s) for s in IMAGE_TOKENS + REASONING_TOKENS + ROLE_TOKENS]
        missing = [s for s in names if self.sp.piece_to_id(s) == self.sp.unk_id()]
        if missing:
            raise ValueError(f"{path} lacks the reserved tokens {missing}; train it with `python -m data.tokenizer`")
        self.special = SpecialIds(
            pad=self.sp.pad_id(),
            bos=self.sp.bos_id(),
            eos=self.sp.eos_id(),
            img_start=self.sp.piece_to_id("<img>"),
            img_end=self.sp.piece_to_id("</img>"),
            row_sep=self.sp.piece_to_id("<row>"),
            patch=self.sp.piece_to_id("<patch>"),
        )

    @property
    def model_bytes(self) -> bytes:
        """The serialised model: what prepared shards are checked against (`data.prepared.fingerprint`)."""
        return self.sp.serialized_model_proto()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def bytes_per_token(self) -> list[int]:
        """UTF-8 bytes each id stands for in text (0 for control and special ids, 1 for a byte-fallback piece):
        what bits per byte divides by, so that losses compare across tokenizers (as nanochat reports them)."""
        out = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                out.append(0)
            elif self.sp.is_byte(i):
                out.append(1)
            else:
                out.append(len(piece.replace("\u2581", " ").encode("utf-8")))
        return out

    def token_id(self, piece: str) -> int:
        """The id of a piece; a role token by its former name in a tokenizer built before roles were named."""
        return self.sp.piece_to_id(self.aliases.get(piece, piece))

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if not self.sp.is_control(i)])

    def __getstate__(self):  # picklable for dataloader workers (aliases are read again from the file)
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def input_files(inputs: list[str]) -> list[Path]:
    """Files, dataset directories (their shards, else the .txt/.jsonl/.tar files under them) and brace patterns
    or globs of shards, as `data.check` takes them."""
    from data.shards import resolve_shards

    files: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = [Path(f) for f in resolve_shards(spec)] or sorted(
                f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".tar") and f.is_file()
            )
        else:
            found = [Path(f) for f in resolve_shards(spec) if Path(f).is_file()]
        if not found:
            raise FileNotFoundError(f"{spec}: no text, JSONL or shard files there")
        files += found
    return files


def iter_texts(paths: list[str]) -> Iterator[str]:
    """Text from .txt/.jsonl files and from the text members of webdataset shards (.tar); directories and brace
    patterns are expanded (`input_files`)."""
    for p in input_files([str(x) for x in paths]):
        if p.suffix == ".tar":
            with tarfile.open(p) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    data = tar.extractfile(m).read()
                    try:
                        if m.name.endswith(".txt"):
                            yield data.decode("utf-8")
                        elif m.name.endswith(".json"):
                            doc = json.loads(data)
                            for seg in doc.get("segments", []) if isinstance(doc, dict) else []:
                                if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                                    yield seg["text"]
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        continue
        elif p.suffix == ".jsonl":
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield json.loads(line).get("text", "")
        else:
            yield p.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(
    texts: Iterator[str],
    out: str | Path,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    normalization: str = "nmt_nfkc",
) -> Tokenizer:
    """Train on an iterator of documents (split into lines), byte fallback on, specials reserved.

    normalization="identity" gives the same bytes under any sentencepiece version: NFKC's table is compiled into
    the model from the library's own Unicode data (0.2.2 and 0.2.3 gave identical pieces and scores in different
    bytes). The study dataset uses it; the embedded one keeps NFKC."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type '{model_type}' is not 'bpe' or 'unigram'")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name=normalization,
        character_coverage=0.9995,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        control_symbols=CONTROL_SYMBOLS,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,  # small corpora: take the vocabulary they support rather than fail
        num_threads=2,
        minloglevel=2,
    )
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(proto.getvalue())
    tmp.replace(out)
    return Tokenizer(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model on text files, JSONL or shards")
    t.add_argument("inputs", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--type", default="bpe", choices=["bpe", "unigram"])
    args = ap.parse_args(argv)
    try:
        files = input_files(args.inputs)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from e
    tok = train_tokenizer(iter_texts([str(f) for f in files]), args.out, args.vocab_size, args.type)
    print(f"wrote {args.out}: {tok.vocab_size} pieces, specials {tok.special}")


if __name__ == "__main__":
    main()
