"""The exported tokenizer for `AutoTokenizer`: our sentencepiece model, read by sentencepiece itself, so its ids are
exactly the ones the model was trained on (transformers' conversion to a `tokenizers` BPE changes whitespace
normalisation and matches control symbols such as "<img>" inside text). Text in, ids out, no special tokens added:
a prompt's <bos> and image markers are the data layout's to place."""

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class FusionTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", **kwargs):
        kwargs.setdefault("split_special_tokens", True)  # "<s>" typed in text is text, as in training
        super().__init__(
            vocab_file=vocab_file,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            legacy=True,
            **kwargs,
        )

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """sentencepiece's own decoding (byte-fallback pieces back to UTF-8), control symbols dropped."""
        ids = [self.sp_model.piece_to_id(t) for t in tokens]
        return self.sp_model.decode([i for i in ids if not self.sp_model.is_control(i)])
