"""Data: tokenizer, webdataset shards, streaming mixtures and packing. Imports nothing from model/ or train/."""
