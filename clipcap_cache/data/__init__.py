"""Inputs and the feature cache: what extraction reads and what training memory-maps.

- `annotations.py`: the annotation formats (COCO, Karpathy, JSON lines, CSV), one `ImageRecord`
  per image;
- `webdataset.py`: image-caption samples streamed out of WebDataset tar shards;
- `images.py`: robust image decoding and CLIP preprocessing in DataLoader workers;
- `cache.py`: the HDF5 feature cache, written once by extraction;
- `tokens.py`: the captions tokenized once, in a file beside the cache.
"""
