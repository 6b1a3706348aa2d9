"""clipcap-cache: image captioning with CLIP prefixes and GPT-2, trained from cached CLIP features.

The subpackages follow the pipeline:

- `data/`: annotation formats, WebDataset tars, image decoding, the HDF5 feature cache and the
  tokenized captions beside it;
- `extraction/`: stage 1, `extract_features`, which runs the frozen CLIP image encoder once;
- `training/`: stage 2, `train`, which fits the projector and the unfrozen GPT-2 blocks from the
  cache alone;
- `inference/`: `Captioner`, which loads a checkpoint once, and `caption` and `serve` around it;
- `evaluation/`: the COCO metrics, BERTScore, CIDEr-D and CLIPScore, and `evaluate` and `score`.
- `sharing/`: `export` (a checkpoint as a folder that loads anywhere, with a model card) and
  `push` (that folder uploaded to the Hugging Face hub).

Beside them: the caption model (`model.py`) and its checkpoint folders (`checkpoint.py`), the
option fields every config is built from (`options.py`, the CLI's source), and small shared
modules (devices, distributed, files, hub, logs, preemption, errors). `demo.py` runs everything
offline on synthetic data.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from clipcap_cache import Captioner` without importing torch for every `clipcap --help`.
    if name == "Captioner":
        from clipcap_cache.inference.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'clipcap_cache' has no attribute '{name}'")
