"""Stage 1: run the frozen CLIP image encoder over a dataset once and write the feature cache.

- `encoder.py`: the frozen CLIP vision tower and its image processor (also used at inference);
- `features.py`: `FeatureConfig` and `extract_features`, crash-safe and resumable, under torchrun.
"""
