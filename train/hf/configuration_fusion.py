"""The transformers config of an exported early-fusion model: our ModelConfig as a dict under `fusion`, plus the
conventional names (hidden_size, num_hidden_layers, ...) that tools read."""

from transformers import PretrainedConfig


class FusionConfig(PretrainedConfig):
    model_type = "fusion"

    def __init__(self, fusion: dict | None = None, **kwargs):
        self.fusion = dict(fusion or {})
        f = self.fusion
        kwargs.setdefault("tie_word_embeddings", bool(f.get("tie_embeddings", False)))
        for name, key in (
            ("vocab_size", "vocab_size"),
            ("hidden_size", "d_model"),
            ("num_hidden_layers", "n_layers"),
            ("num_attention_heads", "n_heads"),
            ("num_key_value_heads", "n_kv_heads"),
            ("max_position_embeddings", "max_seq_len"),
        ):
            kwargs.setdefault(name, f.get(key))
        super().__init__(**kwargs)
