"""The HDF5 feature cache: one row per image, written once by extraction and read by training.

Layout (format version 1; documented in the README):

    /embeddings           [N, D]  float16 (or float32) CLIP image_embeds, not L2-normalised
    /image_ids            [N]     UTF-8
    /image_paths          [N]     UTF-8, relative to the image root
    /splits               [N]     UTF-8, train | val | test
    /captions             [M]     UTF-8
    /caption_image_index  [M]     int64, the row of /embeddings each caption belongs to
    /failed_paths         [F]     UTF-8
    /failed_reasons       [F]     UTF-8
    attributes: format_version, clip_model, clip_fingerprint, embedding_dim, image_size,
                source, complete, package_version, plus split, limit, annotation_format,
                image_processor and storage_dtype

A cache file only ever appears complete: it is written under a temporary name and renamed.
"""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from clipcap_cache.data.annotations import ALL, SPLITS
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import atomic_path, require_file

FORMAT_VERSION = 1
STRING = h5py.string_dtype("utf-8")


@dataclass
class FeatureCache:
    """A cache file read into memory."""

    embeddings: np.ndarray  # (N, D)
    image_ids: list[str]
    image_paths: list[str]
    splits: np.ndarray  # (N,) of str
    captions: list[str]
    caption_image_index: np.ndarray  # (M,) int64
    failed_paths: list[str]
    failed_reasons: list[str]
    attrs: dict

    @property
    def embedding_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def rows_of_split(self, split: str) -> np.ndarray:
        """Row indices of one split, or of every row for `all`."""
        return rows_of_split(self.splits, split)

    def references(self) -> list[list[str]]:
        """All captions of each row, in row order."""
        refs: list[list[str]] = [[] for _ in self.image_ids]
        for caption, row in zip(self.captions, self.caption_image_index.tolist(), strict=True):
            refs[row].append(caption)
        return refs


def rows_of_split(splits: np.ndarray, split: str) -> np.ndarray:
    """Row indices of one split, given each row's split (N,), or of every row for `all`."""
    if split == ALL:
        return np.arange(len(splits))
    return np.flatnonzero(splits == split)


TEXT_KIND = "text"  # the `kind` attribute of a text file from `clipcap embed-text`


def is_text(attrs: dict) -> bool:
    """Whether a cache's rows are caption text embeddings (`clipcap embed-text`), not images."""
    return attrs.get("kind") == TEXT_KIND


def recorded_clip_model(attrs: dict) -> str | None:
    """The CLIP model a cache's attributes record, or None where a cache records none."""
    return attrs.get("clip_model")


def recorded_clip_fingerprint(attrs: dict) -> str | None:
    """The fingerprint of the CLIP weights a cache records, or None (caches of earlier versions)."""
    return attrs.get("clip_fingerprint")


def clip_source(attrs: dict, embedding_dim: int) -> dict:
    """A cache's CLIP model, fingerprint and width, as `check_clip_match` takes them."""
    return {
        "clip_model": recorded_clip_model(attrs),
        "clip_fingerprint": recorded_clip_fingerprint(attrs),
        "embedding_dim": embedding_dim,
    }


@dataclass
class EmbeddingStream:
    """The rows of /embeddings, arriving in order a chunk at a time: never whole in memory."""

    rows: int
    dim: int
    dtype: np.dtype
    chunks: Iterable[np.ndarray]  # (n_i, dim) arrays whose n_i add up to `rows`


def write_cache(
    path: str | Path,
    *,
    embeddings: np.ndarray | EmbeddingStream,
    image_ids,
    image_paths,
    splits,
    captions,
    caption_image_index,
    failed_paths,
    failed_reasons,
    attrs: dict,
) -> None:
    """Write a complete cache atomically: to a temporary name first, then renamed into place.

    /embeddings is stored contiguously, so it can also be memory-mapped.
    """
    if isinstance(embeddings, np.ndarray):
        embeddings = EmbeddingStream(
            len(embeddings), embeddings.shape[1], embeddings.dtype, [embeddings]
        )
    path = Path(path)
    strings = {
        "image_ids": list(image_ids),
        "image_paths": list(image_paths),
        "splits": list(splits),
        "captions": list(captions),
        "failed_paths": list(failed_paths),
        "failed_reasons": list(failed_reasons),
    }
    _refuse_nul(path, strings)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        table = f.create_dataset(
            "embeddings", shape=(embeddings.rows, embeddings.dim), dtype=embeddings.dtype
        )
        written = 0
        for chunk in embeddings.chunks:
            table[written : written + len(chunk)] = chunk
            written += len(chunk)
        if written != embeddings.rows:
            raise ValueError(f"expected {embeddings.rows} embedding rows, got {written}")
        for name, values in strings.items():
            f.create_dataset(name, data=np.array(values, dtype=object), dtype=STRING)
        f.create_dataset("caption_image_index", data=np.asarray(caption_image_index, np.int64))
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["complete"] = True


def _refuse_nul(path: Path, strings: dict[str, list[str]]) -> None:
    """Refuse, before anything is written, a text that HDF5 cannot store: one holding NUL."""
    for name, values in strings.items():
        for row, value in enumerate(values):
            if "\x00" in value:
                raise ClipcapError(
                    f"cannot write {path}: /{name} row {row} ({value[:60]!r}) holds a NUL "
                    "character, which an HDF5 string cannot store; remove it from the input"
                )


def read_attrs(path: str | Path) -> dict:
    """The attributes of a cache file, with a clear error if it is not one."""
    path = Path(path)
    require_file(path, "feature cache")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError:
        raise ClipcapError(f"{path} is not a readable HDF5 feature cache") from None
    if "format_version" not in attrs:
        raise ClipcapError(f"{path} is an HDF5 file but not a clipcap feature cache")
    return attrs


STRING_DATASETS = (
    "image_ids",
    "image_paths",
    "splits",
    "captions",
    "failed_paths",
    "failed_reasons",
)


def read_cache(path: str | Path, require_complete: bool = True) -> FeatureCache:
    """Read a whole cache into memory, checking its format version, completeness and contents."""
    path = Path(path)
    attrs = _check_version(path, require_complete)
    try:
        with h5py.File(path, "r") as f:
            _check_present(path, f)
            strings = {name: list(f[name].asstr()[()]) for name in STRING_DATASETS}
            found = FeatureCache(
                embeddings=f["embeddings"][()],
                caption_image_index=f["caption_image_index"][()].astype(np.int64),
                splits=np.array(strings.pop("splits"), dtype=str),
                attrs=attrs,
                **strings,
            )
    except (OSError, TypeError, ValueError) as e:
        raise ClipcapError(f"{path}: cannot read the cache's datasets ({e})") from None
    _check_contents(path, found)
    return found


def _check_version(path: Path, require_complete: bool) -> dict:
    """The attributes of a cache this version reads; refuses other versions and unfinished files."""
    attrs = read_attrs(path)
    if attrs["format_version"] != FORMAT_VERSION:
        raise ClipcapError(
            f"{path} has cache format version {attrs['format_version']!r}, but this version "
            f"of clipcap-cache reads only version {FORMAT_VERSION}"
        )
    if require_complete and not attrs.get("complete", False):
        raise ClipcapError(f"{path} is an incomplete cache: rerun extract-features to finish it")
    return attrs


def _check_present(path: Path, f: h5py.File) -> None:
    missing = [n for n in ("embeddings", "caption_image_index", *STRING_DATASETS) if n not in f]
    if missing:
        raise ClipcapError(f"{path} is not a complete feature cache: no /{missing[0]}")


def _check_contents(path: Path, found: FeatureCache) -> None:
    """Refuse a cache whose datasets disagree with each other or hold non-finite embeddings."""
    lengths = {name: len(getattr(found, name)) for name in STRING_DATASETS}
    _check_datasets(
        path, found.attrs, lengths, found.embeddings, found.caption_image_index, found.image_ids
    )


def _check_datasets(path: Path, attrs: dict, lengths: dict, embeddings, index, image_ids) -> None:
    """The checks of `read_cache` and `open_cache`, on arrays in memory or memory-mapped.

    `lengths` holds the length of each string dataset; `image_ids` is anything indexable by row.
    The embeddings are scanned in blocks, so a mapped file is never copied whole.
    """
    if embeddings.ndim != 2 or embeddings.shape[1] == 0:
        raise ClipcapError(f"{path}: /embeddings has shape {embeddings.shape}, expected (N, D)")
    dim = attrs.get("embedding_dim")
    if dim is not None and dim != embeddings.shape[1]:
        raise ClipcapError(
            f"{path}: embedding_dim is {dim}, but /embeddings is {embeddings.shape[1]}-d"
        )
    rows = len(embeddings)
    for name in ("image_ids", "image_paths", "splits"):
        if lengths[name] != rows:
            raise ClipcapError(f"{path}: /{name} has {lengths[name]} rows, /embeddings {rows}")
    if index.ndim != 1 or len(index) != lengths["captions"]:
        raise ClipcapError(f"{path}: /caption_image_index does not match /captions")
    if len(index) and (index.min() < 0 or index.max() >= rows):
        raise ClipcapError(f"{path}: /caption_image_index points outside /embeddings")
    if lengths["failed_paths"] != lengths["failed_reasons"]:
        raise ClipcapError(f"{path}: /failed_paths does not match /failed_reasons")
    bad = []
    for start in range(0, rows, CHECK_BLOCK):
        finite = np.isfinite(embeddings[start : start + CHECK_BLOCK]).all(axis=1)
        bad.extend((start + np.flatnonzero(~finite)).tolist())
    if bad:
        raise ClipcapError(
            f"{path}: {len(bad)} embeddings hold NaN or inf (first: row {bad[0]}, image "
            f"{image_ids[bad[0]]}); extract them again"
        )


CHECK_BLOCK = 2048  # rows checked at a time: the temporaries stay small


@dataclass
class MappedCache:
    """A cache opened for training: its big arrays memory-mapped, its captions read on demand.

    /embeddings and /caption_image_index are mapped straight from the file (`np.memmap` at the
    dataset's offset in it). The operating system then keeps one copy of their pages for every
    process of a node, and can drop them under memory pressure: under DDP the data is not copied
    once per rank, and a cache may be bigger than RAM. The caption strings stay in the file.
    """

    path: Path
    attrs: dict
    embeddings: np.ndarray  # (N, D) read-only memmap (an in-memory array for chunked files)
    caption_image_index: np.ndarray  # (M,) int64, likewise
    splits: np.ndarray  # (N,) of str

    @property
    def embedding_dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def num_images(self) -> int:
        return len(self.embeddings)

    def rows_of_split(self, split: str) -> np.ndarray:
        """Row indices of one split, or of every row for `all`."""
        return rows_of_split(self.splits, split)

    def captions_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Indices of the captions that belong to some rows, in file order."""
        wanted = np.zeros(self.num_images, dtype=bool)
        wanted[rows] = True
        indices = np.flatnonzero(wanted[self.caption_image_index])
        # int32 halves this per-process array, the one part of the data that is not shared.
        return indices.astype(np.int32) if len(self.caption_image_index) < 2**31 else indices

    def captions(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Captions start..stop, read from the file."""
        with h5py.File(self.path, "r") as f:
            return list(f["captions"].asstr()[start:stop])

    def image_ids_of(self, rows: np.ndarray) -> list[str]:
        """The image ids of some rows, read from the file."""
        with h5py.File(self.path, "r") as f:
            ids = f["image_ids"].asstr()[()]
        return [ids[int(row)] for row in rows]

    def references(self, rows: np.ndarray) -> list[list[str]]:
        """All captions of each of some rows, in the order of `rows`."""
        indices = self.captions_of_rows(rows)
        with h5py.File(self.path, "r") as f:
            texts = list(f["captions"].asstr()[indices]) if len(indices) else []
        refs: dict[int, list[str]] = {int(r): [] for r in rows}
        for caption, row in zip(texts, self.caption_image_index[indices].tolist(), strict=True):
            refs[row].append(caption)
        return [refs[int(r)] for r in rows]


def open_cache(path: str | Path) -> MappedCache:
    """Open a complete cache for training, with the same checks as `read_cache`."""
    path = Path(path)
    attrs = _check_version(path, require_complete=True)
    try:
        with h5py.File(path, "r") as f:
            _check_present(path, f)
            lengths = {name: len(f[name]) for name in STRING_DATASETS}
            embeddings = map_dataset(path, f["embeddings"])
            index = map_dataset(path, f["caption_image_index"]).astype(np.int64, copy=False)
            splits = _read_strings_in_blocks(f["splits"])
            image_ids = f["image_ids"].asstr()
            _check_datasets(path, attrs, lengths, embeddings, index, _Lazy(image_ids))
    except (OSError, TypeError, ValueError) as e:
        raise ClipcapError(f"{path}: cannot read the cache's datasets ({e})") from None
    return MappedCache(path, attrs, embeddings, index, splits)


def _read_strings_in_blocks(dataset) -> np.ndarray:
    """A short-string dataset as a numpy str array, never holding every row as a Python str."""
    blocks = [
        np.array(dataset.asstr()[start : start + CHECK_BLOCK], dtype=str)
        for start in range(0, len(dataset), CHECK_BLOCK)
    ]
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=str)


class _Lazy:
    """Rows of an open h5py dataset, read one at a time (for error messages)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, row):
        return self.dataset[int(row)]


def map_dataset(path: Path, dataset) -> np.ndarray:
    """A read-only memmap of a contiguous, uncompressed dataset; else the dataset read whole."""
    offset = dataset.id.get_offset()
    if offset is None or dataset.chunks is not None or len(dataset) == 0:
        return dataset[()]
    return np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)


def describe(path: str | Path) -> dict:
    """A summary of a cache for `clipcap inspect`: model, dimension, counts and failures."""
    cache = read_cache(path, require_complete=False)
    per_split = Counter(cache.splits.tolist())
    captions_per_split = Counter(cache.splits[cache.caption_image_index].tolist())
    reasons = Counter(reason.split(" (")[0] for reason in cache.failed_reasons)
    return {
        "path": str(path),
        "format_version": cache.attrs["format_version"],
        "complete": bool(cache.attrs.get("complete", False)),
        "kind": "text" if is_text(cache.attrs) else "images",  # a row per caption, or per image
        "clip_model": recorded_clip_model(cache.attrs),
        "clip_fingerprint": recorded_clip_fingerprint(cache.attrs),
        "embedding_dim": cache.embedding_dim,
        "image_size": cache.attrs.get("image_size"),
        "dtype": str(cache.embeddings.dtype),
        "source": cache.attrs.get("source"),
        "images": len(cache.image_ids),
        "captions": len(cache.captions),
        "splits": {
            s: {"images": per_split[s], "captions": captions_per_split[s]}
            for s in SPLITS
            if per_split[s]
        },
        "failed": len(cache.failed_paths),
        "failed_reasons": dict(reasons),
        "package_version": cache.attrs.get("package_version"),
    }


def _plain(value):
    """HDF5 attribute values as plain Python types."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value
