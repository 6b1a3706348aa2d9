"""Scoring captions: the COCO metrics, BERTScore, CIDEr-D and CLIPScore.

- `metrics.py`: the metrics shared by evaluation and training validation;
- `cider.py`: a fast CIDEr-D (also the self-critical reward) and a PTB-style tokenizer;
- `clipscore.py`: CLIPScore and RefCLIPScore from cached image embeddings;
- `evaluate.py`: `clipcap evaluate`, a checkpoint on a cache's split;
- `score.py`: `clipcap score`, any system's captions against references.
"""
