"""Training: composes model/ and data/ under DeepSpeed (config, engine, loop, checkpoints, metrics, eval)."""
