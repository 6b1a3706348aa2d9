"""clipcap-cache: image captioning with CLIP prefixes and GPT-2, trained from cached CLIP features.

The pipeline has two stages. `extraction.features.extract_features` runs a frozen CLIP image encoder over a
dataset once and writes the embeddings to an HDF5 cache (`data/cache.py`). `training.train.train` then fits a
projector and the unfrozen GPT-2 blocks from that cache alone. `Captioner` (`inference/captioner.py`) loads a
trained checkpoint once and captions images; `caption.py`, `serve.py` and `evaluate.py` use it, and
`demo.py` runs everything offline on synthetic data.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from clipcap_cache import Captioner` without importing torch for every `clipcap --help`.
    if name == "Captioner":
        from clipcap_cache.inference.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'clipcap_cache' has no attribute '{name}'")
