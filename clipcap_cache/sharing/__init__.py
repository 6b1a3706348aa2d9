"""Sharing a trained model: a hub-ready folder with a model card, and its upload to the hub.

- `export.py`: `clipcap export`, a checkpoint as a folder that loads anywhere: the trained
  tensors, the config, the tokenizer, the card, and the base models by hub name or copied in;
- `card.py`: the model card (README.md with the hub's YAML front matter) from a checkpoint's
  config and its run's evaluations;
- `push.py`: `clipcap push`, an export uploaded with `huggingface_hub`.

Loading a shared model by its hub id is `checkpoint.resolve`'s, so that every stage takes one.
"""
