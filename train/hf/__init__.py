"""Hugging Face transformers export (`python -m train.export RUN --hf OUT` or `--hf-text OUT`).

`configuration_fusion`, `modeling_fusion` and `tokenization_fusion` are the remote-code files of an exported folder.
In this repo they import `model/`; the export inlines `model/`'s own source in their place (`train.hf.export`), so
the folder's modeling code is the decoder this repo trains, not a second copy that could drift from it.
"""
