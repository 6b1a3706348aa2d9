"""`clipcap embed-text`: CLIP text embeddings of captions, written once into a text file.

    clipcap embed-text data/coco/dataset_coco.json --split train --out data/coco_text.h5
    clipcap embed-text data/coco_vitb32.h5 --out data/coco_text.h5   # a cache's captions and CLIP

The source is an annotation file in any format `extract-features` reads (only its captions are
read, never an image), or a feature cache (its captions, and the CLIP model that made it). Only
CLIP's text tower is loaded. The text file is the feature cache's layout with one row per caption
(see `data/cache.py` and the README's formats section): its embeddings are the captions' CLIP
`text_embeds`, not normalised, and its rows keep each caption's text, split, image id and image
path. It serves as the datastore of retrieval-augmented training (`retrieval.py`) and as the
training data of a captioner trained from text alone (`clipcap train TEXT.h5`).

Writing is resumable and atomic, as extraction is: shards of `shard_size` captions go to
`TEXT.h5.parts/` under temporary names; a rerun after a crash skips the finished ones; the
complete file is gathered under a temporary name and renamed, and the folder removed.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from clipcap_cache import __version__
from clipcap_cache.checkpoint import check_clip_match
from clipcap_cache.checks import at_least, check_types
from clipcap_cache.data import cache
from clipcap_cache.data.annotations import (
    FORMATS,
    SPLIT_CHOICES,
    fingerprint,
    read_annotations,
    select_split,
)
from clipcap_cache.devices import DEVICE, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.extraction.encoder import DEFAULT_CLIP_MODEL
from clipcap_cache.extraction.features import (
    PARTS_FORMAT,
    STORAGE_DTYPES,
    _check_same_inputs,
    _read_manifest,
    _shard_path,
    _start_parts,
)
from clipcap_cache.files import atomic_path, exclusive_lock, os_errors, refuse_folder
from clipcap_cache.hub import resolve_name
from clipcap_cache.options import check_choices, option

log = logging.getLogger(__name__)


@dataclass
class TextConfig:
    """Settings of `clipcap embed-text`; recorded in the text file's attributes."""

    source: str = option(
        help="Annotation file (COCO, Karpathy, JSON lines, CSV), or a feature cache (.h5).",
        argument=True,
        metavar="source",
    )
    out: str = option(help="HDF5 text file to write.")
    clip_model: str | None = option(
        None,
        help="CLIP hub name or local directory.",
        default_text=f"a cache's own, else {DEFAULT_CLIP_MODEL}",
    )
    split: str = option("all", help="Which split's captions to embed.", choices=SPLIT_CHOICES)
    format: str = option("auto", help="Annotation format.", choices=FORMATS)
    batch_size: int = option(256, help="Captions per text-encoder batch.")
    device: str = DEVICE.field()
    dtype: str = option("float16", help="Storage dtype of /embeddings.", choices=STORAGE_DTYPES)
    shard_size: int = option(65536, help="Captions per crash-safe progress shard.")
    overwrite: bool = option(False, help="Replace an existing text file made from other inputs.")

    def __post_init__(self):
        check_types(self)
        at_least(self, 1, "batch_size", "shard_size")
        check_choices(self)


@dataclass
class Captions:
    """The captions to embed, one entry per caption, with what is known of each one's image."""

    texts: list[str]
    splits: list[str]
    image_ids: list[str]
    image_paths: list[str]
    clip_model: str
    identity: str  # the source file's name and content hash
    source_format: str  # "feature cache", or the annotation format
    # A source cache's CLIP model, fingerprint and width (`cache.clip_source`), which the text
    # tower is checked against; None for an annotation file.
    source_clip: dict | None = None


def embed_text(config: TextConfig) -> dict:
    """Embed the captions of `config.source` (or finish an interrupted run); returns a summary.

    The source, the output path and the CLIP model are checked before anything on disk changes.
    """
    out = Path(config.out)
    refuse_folder(out, f"--out {out} is a directory; give the HDF5 file to write in it")
    captions = read_captions(config)
    device = resolve_device(config.device)
    identity = {
        "source": captions.identity,
        "clip_model": captions.clip_model,
        "split": config.split,
        "storage_dtype": config.dtype,
    }
    with exclusive_lock(out):
        if out.exists() and not config.overwrite:
            _check_same_inputs(identity, cache.read_attrs(out), out)
            done = cache.read_cache(out)
            return {"out": str(out), "captions": len(done.captions), "already_complete": True}
        return _embed(config, captions, identity, device)


def read_captions(config: TextConfig) -> Captions:
    """The captions of an annotation file or a feature cache, of the chosen split."""
    path = Path(config.source)
    if not path.is_file():
        raise ClipcapError(f"source not found: {path}")
    identity = f"{path.name}:{fingerprint(path)}"
    if h5py.is_hdf5(path):
        return _captions_of_cache(path, config, identity)
    records = select_split(read_annotations(path, config.format), config.split)
    texts, splits, ids, paths = [], [], [], []
    for record in records:
        for text in record.captions:
            texts.append(text)
            splits.append(record.split)
            ids.append(record.image_id)
            paths.append(record.path)
    if not texts:
        raise ClipcapError(f"{path} has no captions in split '{config.split}'")
    clip_model = resolve_name(config.clip_model or DEFAULT_CLIP_MODEL)
    return Captions(texts, splits, ids, paths, clip_model, identity, config.format)


def _captions_of_cache(path: Path, config: TextConfig, identity: str) -> Captions:
    found = cache.read_cache(path)
    if cache.is_text(found.attrs):
        raise ClipcapError(f"{path} is already a text file; give an annotation file or a cache")
    clip_model = cache.recorded_clip_model(found.attrs)
    if not clip_model:
        raise ClipcapError(f"{path} does not record its CLIP model: pass its annotation file")
    if config.clip_model is not None and resolve_name(config.clip_model) != clip_model:
        raise ClipcapError(
            f"{path} was made with CLIP model {clip_model}, not {config.clip_model}: its "
            "captions are embedded with its own model (leave --clip-model out)"
        )
    wanted = np.zeros(len(found.image_ids), dtype=bool)
    wanted[found.rows_of_split(config.split)] = True
    kept = wanted[found.caption_image_index]  # (M,) whether each caption is of the split
    rows = found.caption_image_index[kept]
    texts = [t for t, keep in zip(found.captions, kept, strict=True) if keep]
    if not texts:
        raise ClipcapError(f"{path} has no captions in split '{config.split}'")
    return Captions(
        texts=texts,
        splits=found.splits[rows].tolist(),
        image_ids=[found.image_ids[r] for r in rows],
        image_paths=[found.image_paths[r] for r in rows],
        clip_model=clip_model,
        identity=identity,
        source_format="feature cache",
        source_clip=cache.clip_source(found.attrs, found.embedding_dim),
    )


def _embed(config: TextConfig, captions: Captions, identity: dict, device) -> dict:
    """Embed the shards not yet done, then gather them into the text file."""
    from clipcap_cache.evaluation.clipscore import load_clip_text

    out = Path(config.out)
    parts = out.with_name(out.name + ".parts")
    manifest = _read_manifest(parts)
    if manifest is not None and any(manifest.get(k) != v for k, v in identity.items()):
        if not config.overwrite:
            _check_same_inputs(identity, manifest, parts)
        manifest = None
    shard_size = manifest["shard_size"] if manifest else config.shard_size
    bounds = [
        (start, min(start + shard_size, len(captions.texts)))
        for start in range(0, len(captions.texts), shard_size)
    ]
    pending = [
        i for i in range(len(bounds)) if manifest is None or not _shard_path(parts, i).exists()
    ]
    if manifest is not None and len(pending) < len(bounds):
        log.info("resuming: %d of %d shards already done", len(bounds) - len(pending), len(bounds))
    if pending:
        text = load_clip_text(captions.clip_model, device)
        dim = int(text.model.config.projection_dim)
        # The weights at the CLIP model's name must be those the source cache, and the progress
        # so far, were made with: text and image embeddings of two CLIP models do not mix.
        checked = (
            (captions.source_clip, f"the cache {config.source}"),
            (manifest, f"the progress in {parts}"),
        )
        for expected, made in checked:
            if expected is not None:
                check_clip_match(
                    expected, text.name, dim, f"CLIP model {text.name}", made, text.fingerprint
                )
        if manifest is None:
            manifest = {
                **identity,
                "parts_format": PARTS_FORMAT,
                "shard_size": shard_size,
                "num_shards": len(bounds),
                "embedding_dim": dim,
                "clip_fingerprint": text.fingerprint,
            }
            _start_parts(parts, manifest, out)
        left = sum(bounds[s][1] - bounds[s][0] for s in pending)
        total = len(captions.texts)
        with tqdm(total=total, initial=total - left, unit="caption", desc="embed-text") as bar:
            for shard in pending:
                start, stop = bounds[shard]
                embeds = text.embed(captions.texts[start:stop], config.batch_size).numpy()
                with atomic_path(_shard_path(parts, shard)) as tmp:
                    save_file({"embeddings": embeds.astype(config.dtype)}, str(tmp))
                bar.update(stop - start)
    _gather(parts, out, len(bounds), manifest, captions, config)
    shutil.rmtree(parts, ignore_errors=True)
    return {"out": str(out), "captions": len(captions.texts), "already_complete": False}


def _gather(parts: Path, out: Path, shards: int, manifest: dict, captions: Captions, config):
    """The text file from the finished shards, written atomically a shard at a time."""
    attrs = {
        "kind": cache.TEXT_KIND,
        "clip_model": captions.clip_model,
        "embedding_dim": manifest["embedding_dim"],
        "source": captions.identity,
        "source_format": captions.source_format,
        "split": config.split,
        "storage_dtype": config.dtype,
        "package_version": __version__,
    }
    if manifest.get("clip_fingerprint") is not None:  # progress of earlier versions has none
        attrs["clip_fingerprint"] = manifest["clip_fingerprint"]
    with os_errors(f"cannot write {out}"):
        cache.write_cache(
            out,
            embeddings=cache.EmbeddingStream(
                rows=len(captions.texts),
                dim=manifest["embedding_dim"],
                dtype=np.dtype(config.dtype),
                chunks=(load_file(str(_shard_path(parts, s)))["embeddings"] for s in range(shards)),
            ),
            image_ids=captions.image_ids,
            image_paths=captions.image_paths,
            splits=captions.splits,
            captions=captions.texts,
            # A row is a caption: each caption is its own row's only one.
            caption_image_index=np.arange(len(captions.texts), dtype=np.int64),
            failed_paths=[],
            failed_reasons=[],
            attrs=attrs,
        )
