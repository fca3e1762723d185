"""Generation: the batched engine (prefill once, cached decoding, forking samples from one prefill)."""

from infer.engine import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams"]
