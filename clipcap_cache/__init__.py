"""clipcap-cache: image captioning with CLIP prefixes and GPT-2, trained from cached CLIP features.

The pipeline has two stages. `features.extract_features` runs a frozen CLIP image encoder over a
dataset once and writes the embeddings to an HDF5 cache (`cache.py`). `train.train` then fits a
projector and the unfrozen GPT-2 blocks from that cache alone. `caption.py` and `evaluate.py` use
the trained checkpoint, and `demo.py` runs everything offline on synthetic data.
"""

__version__ = "0.1.0"
