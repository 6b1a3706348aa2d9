"""Captions from a trained checkpoint.

- `generate.py`: decoding from CLIP embeddings with transformers' `generate()`;
- `captioner.py`: `Captioner`, which loads a checkpoint and its CLIP encoder once;
- `caption.py`: `clipcap caption` (files, directories, globs; text, JSON, JSON lines, CSV);
- `serve.py`: `clipcap serve`, an HTTP API with dynamic batching and a web page (`static/`).
"""
