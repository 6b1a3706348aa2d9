"""Hugging Face `datasets` input: image-caption rows read through the `datasets` library.

    clipcap extract-features data/flickr30k_saved --out flickr30k.h5       # Dataset.save_to_disk
    clipcap extract-features 'data/coco/train-{00000..00003}.parquet' --out coco.h5
    clipcap extract-features user/flickr30k --out flickr30k.h5             # a hub dataset id
    clipcap extract-features photos/ --out photos.h5       # imagefolder: photos/metadata.jsonl

Four layouts are read, each into one or more splits of rows:

- a directory written by `Dataset.save_to_disk` (`state.json`) or `DatasetDict.save_to_disk`
  (`dataset_dict.json`), opened with `load_from_disk` (memory-mapped, nothing copied);
- Parquet files: a file, a brace pattern, a glob, or a directory holding `*.parquet` (a hub
  repository's `data/` folder). A file's split is the first word of its name (`train-00000.parquet`,
  `validation-...`, `test-...`); others have none. They are streamed, not copied;
- a hub dataset id (`user/name`), opened with `load_dataset_builder` and streamed. Offline
  (`HF_HUB_OFFLINE=1`) `datasets` finds it only in its cache, from an earlier download;
- the `imagefolder` layout: images beside a `metadata.jsonl` or `metadata.csv` whose `file_name`
  column names them, loaded with `load_dataset("imagefolder", data_dir=...)`.

A row is one image. Its columns are found by name unless given (`--image-column`,
`--caption-column`, `--split-column`, `--id-column`): the image is a column of the `Image`
feature (or a `{"bytes", "path"}` struct, bytes, or a path); the captions are a string column or a
list of strings (Karpathy's `sentences`); the split is the split column's value, else the name of
the dataset's split (`validation` is val), else `--split-default`; the image id is the id column,
else the image's own path.

The unit of work is a part: `shard_size` rows of a memory-mapped dataset, or one shard (file) of a
streamed one. Each part is read by one DataLoader worker of one rank, which decodes the image bytes
in memory, and becomes one crash-safe progress shard of the extraction. A row whose image does not
decode, or whose columns hold the wrong kind of value (or a text with a NUL character, which HDF5
cannot store), is a recorded failure; a part that cannot be read to its end keeps the rows before
the damage and records the rest as one failure. An id column must hold text or integers, and two
rows of one image id are refused when the cache is gathered (`features._refuse_repeated_ids`).

`datasets` is an optional extra, imported only when such an input is given.
"""

import hashlib
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from clipcap_cache.data.annotations import ALL, SPLIT_ALIASES, SPLITS, TRAIN, ImageRecord
from clipcap_cache.data.images import ImageLoadError, ShardBatch, decode_image, load_image
from clipcap_cache.data.webdataset import pattern_paths
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import read_json

EXTRA = 'pip install "clipcap-cache[datasets]"'
LAYOUTS = ("save_to_disk", "parquet", "hub", "imagefolder")
IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
CAPTION_NAMES = ("caption", "captions", "sentences", "text", "raw", "sentence", "txt")
ID_NAMES = ("image_id", "id", "cocoid", "imgid", "img_id")
SPLIT_NAMES = ("split",)
COLUMN_FLAGS = {
    "image": "--image-column",
    "caption": "--caption-column",
    "split": "--split-column",
    "image_id": "--id-column",
}
UNSPLIT = "rows"  # the name of rows that no split name places (a Dataset, a Parquet file)
# A hub id is `user/name` (or `name`); a path with an annotation or shard suffix is not one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tar", ".tgz", ".gz", ".parquet", ".txt", ".h5")
_READ_ERRORS = (OSError, ValueError, EOFError)  # pyarrow's errors subclass these
NUL = "\x00"  # a text of a row holding one is a failure: HDF5 strings cannot store it


def require_datasets():
    """The `datasets` module, or one line naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise ClipcapError(
            f"reading Hugging Face datasets needs the datasets package ({EXTRA})"
        ) from None
    return datasets


def layout_of(source: str, format: str = "auto") -> str | None:
    """Which datasets layout a source is (`LAYOUTS`), or None for another kind of input.

    Decided from names alone, without importing `datasets`.
    """
    if format not in ("auto", "datasets"):
        return None
    path = Path(source)
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError:  # a name the system cannot even look up (too long, say): not a dataset
        is_dir, exists = False, False
    if is_dir:
        found = _directory_layout(path)
        if found is None and format == "datasets":
            raise ClipcapError(
                f"{source} is not a datasets directory: it holds no dataset_dict.json or "
                "state.json (save_to_disk), no metadata.jsonl or metadata.csv (imagefolder), "
                "and no *.parquet"
            )
        return found
    if source.lower().endswith(".parquet") or ("{" in source and ".parquet" in source.lower()):
        return "parquet"
    if format == "datasets" or (
        not exists
        and _HUB_ID.fullmatch(source)
        and "/" in source
        and not source.lower().endswith(_FILE_SUFFIXES)
    ):
        return "hub"
    return None


def _directory_layout(path: Path) -> str | None:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "save_to_disk"
    metadata = ("metadata.jsonl", "metadata.csv")
    if any((path / m).is_file() for m in metadata) or any(
        (child / m).is_file() for child in path.iterdir() if child.is_dir() for m in metadata
    ):
        return "imagefolder"
    if any(path.rglob("*.parquet")):
        return "parquet"
    return None


@dataclass(frozen=True)
class Columns:
    """The columns that hold a row's image, captions, split and id (None: not in the data)."""

    image: str
    caption: str
    split: str | None
    image_id: str | None


@dataclass
class Part:
    """One unit of work: rows `start:stop` of a dataset, or shard `shard` of a streamed one."""

    dataset: object  # datasets.Dataset or datasets.IterableDataset, only the used columns
    split_name: str  # the dataset's own name for the split, for failures ("train")
    split: str | None  # train, val or test for rows whose split column is empty; None: default
    start: int = 0
    stop: int = 0
    shard: int | None = None
    num_shards: int = 0
    shard_name: str | None = None  # a streamed shard's file name, when known

    def where(self, row: int) -> str:
        """A row's name in failures and in the cache when it has no path.

        `train/17` (row 17 of a Dataset), `train-00001.parquet/3` (row 3 of a file), or
        `train/shard-00002/3` (row 3 of a streamed shard).
        """
        if self.shard is None:
            return f"{self.split_name}/{self.start + row}"
        if self.shard_name is not None:
            return f"{self.shard_name}/{row}"
        return f"{self.split_name}/shard-{self.shard:05d}/{row}"

    def rows(self, batch_size: int) -> Iterator[dict]:
        """The part's rows in order, as dicts of column values."""
        if self.shard is None:
            data = self.dataset.select(range(self.start, self.stop))
        else:
            data = self.dataset.shard(num_shards=self.num_shards, index=self.shard)
        # `.iter` reads arrow batches and, unlike `iter(dataset)`, does not share the shards of a
        # streamed dataset among DataLoader workers itself: here a part is one worker's whole.
        for batch in data.iter(batch_size=batch_size):
            names = list(batch)
            for values in zip(*(batch[n] for n in names), strict=True):
                yield dict(zip(names, values, strict=True))


@dataclass
class DatasetSource:
    """A datasets input resolved: its splits to read, its columns and what identifies it."""

    layout: str
    # (split name, dataset, its rows' split, its shards' file names or None)
    splits: list[tuple[str, object, str | None, list[str] | None]]
    columns: Columns
    identity: str
    root: Path | None  # where relative image paths are found

    def parts(self, shard_size: int) -> list[Part]:
        """The units of work in order: `shard_size` rows of a Dataset, or a streamed shard."""
        parts = []
        for name, data, split, shard_names in self.splits:
            if hasattr(data, "num_rows"):
                rows = data.num_rows
                parts.extend(
                    Part(data, name, split, start=start, stop=min(start + shard_size, rows))
                    for start in range(0, rows, shard_size)
                )
            else:
                count = data.num_shards
                names = shard_names if shard_names and len(shard_names) == count else None
                parts.extend(
                    Part(
                        data,
                        name,
                        split,
                        shard=s,
                        num_shards=count,
                        shard_name=names[s] if names else None,
                    )
                    for s in range(count)
                )
        return parts


def open_source(
    source: str,
    layout: str,
    split: str = ALL,
    split_default: str = TRAIN,
    columns: dict | None = None,
    images: str | None = None,
) -> DatasetSource:
    """Open a datasets input and find its columns and parts; raises `ClipcapError`.

    Args:
        source: the directory, Parquet pattern or hub id.
        layout: one of `LAYOUTS` (see `layout_of`).
        split: only splits that can hold rows of this split are kept (`all`: every split).
        split_default: the split of rows that neither a split column nor a split name places.
        columns: the names given for `image`, `caption`, `split`, `image_id` (None: detect).
        images: the root of image paths that are relative (default: the source directory).

    """
    datasets = require_datasets()
    opener = {
        "save_to_disk": _open_saved,
        "parquet": _open_parquet,
        "hub": _open_hub,
        "imagefolder": _open_imagefolder,
    }[layout]
    splits, identity, shard_names = opener(datasets, source)
    found = _columns(_features(splits[0][1], source), columns or {}, source)
    used = [c for c in (found.image, found.caption, found.split, found.image_id) if c]
    kept, rows = [], 0
    for name, data in splits:
        have = _features(data, source)
        missing = [c for c in used if c not in have]
        if missing:
            raise ClipcapError(
                f"{source}: split '{name}' has no column '{missing[0]}'; its columns are: "
                + ", ".join(have)
            )
        dataset_split = _dataset_split(name, found, source)
        if split != ALL and found.split is None and (dataset_split or split_default) != split:
            continue  # every row of this split is elsewhere: it is not read at all
        data = _without_decoding(datasets, data.select_columns(used), found.image)
        kept.append((name, data, dataset_split, shard_names.get(name)))
        rows += getattr(data, "num_rows", 1)  # a streamed split's length is not known
    if not kept:
        names = ", ".join(name for name, _ in splits)
        raise ClipcapError(f"{source} has no rows in split '{split}' (its splits: {names})")
    if rows == 0:
        raise ClipcapError(
            f"{source}: the dataset has no rows" + (f" in split '{split}'" if split != ALL else "")
        )
    directory = Path(source) if Path(source).is_dir() else None
    root = Path(images) if images is not None else directory
    named = ",".join(str(c) for c in (found.image, found.caption, found.split, found.image_id))
    return DatasetSource(layout, kept, found, f"{layout}:{identity}:columns {named}", root)


def _dataset_split(name: str, columns: Columns, source: str) -> str | None:
    """The split a dataset's split name gives its rows (`validation` is val); None: unsplit."""
    if name == UNSPLIT:
        return None
    mapped = SPLIT_ALIASES.get(name.lower(), name.lower())
    if mapped in SPLITS:
        return mapped
    if columns.split is None:
        raise ClipcapError(
            f"{source}: split '{name}' is not train, val or test; name the column that holds "
            "each row's split with --split-column"
        )
    return None


def _open_saved(datasets, source: str):
    directory = Path(source)
    split_dirs = {None: directory}
    if (directory / "dataset_dict.json").is_file():
        index = read_json(directory / "dataset_dict.json", "save_to_disk index")
        names = index.get("splits", []) if isinstance(index, dict) else []
        split_dirs = {str(name): directory / str(name) for name in names}
    for name, split_dir in split_dirs.items():
        state = split_dir / "state.json"
        # save_to_disk writes no data file for an empty dataset, and load_from_disk fails on it.
        found = read_json(state, "save_to_disk state") if state.is_file() else None
        if isinstance(found, dict) and found.get("_data_files") == []:
            if name is None:
                raise ClipcapError(f"{source}: the dataset has no rows")
            raise ClipcapError(
                f"{source}: split '{name}' has no rows, and load_from_disk cannot read an empty "
                "split; save the DatasetDict without it"
            )
    try:
        loaded = datasets.load_from_disk(source)
    except (FileNotFoundError, ValueError, OSError, KeyError) as e:
        raise ClipcapError(
            f"{source}: not a readable save_to_disk directory ({_first_line(e)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.items())
    else:  # one Dataset: its rows have the split it was loaded as, if any
        splits = [(str(loaded.split) if loaded.split else UNSPLIT, loaded)]
    digest = hashlib.sha256()
    for name, data in splits:
        digest.update(f"{name}:{data.num_rows}:{data._fingerprint}\n".encode())
    return splits, digest.hexdigest()[:16], {}


def _open_imagefolder(datasets, source: str):
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=source)
    except (FileNotFoundError, ValueError, OSError, KeyError, TypeError) as e:
        raise ClipcapError(f"{source}: not a readable imagefolder ({_first_line(e)})") from None
    digest = hashlib.sha256()
    for name, data in loaded.items():
        digest.update(f"{name}:{data.num_rows}:{data._fingerprint}\n".encode())
    return list(loaded.items()), digest.hexdigest()[:16], {}


def _open_hub(datasets, source: str):
    try:
        builder = datasets.load_dataset_builder(source)
        streamed = builder.as_streaming_dataset()
    except (ConnectionError, FileNotFoundError, ValueError, OSError) as e:
        offline = " (offline, a dataset is found only in the datasets cache)"
        raise ClipcapError(
            f"no file or directory '{source}', and cannot load the hub dataset '{source}': "
            + _first_line(e)
            + (offline if datasets.config.HF_HUB_OFFLINE else "")
        ) from None
    return list(streamed.items()), f"{source}@{builder.hash}", {}


def _open_parquet(datasets, source: str):
    files = parquet_paths(source)
    import pyarrow.parquet as pq

    rows = 0
    digest = hashlib.sha256()
    by_split: dict[str, list[str]] = {name: [] for name in (*SPLITS, UNSPLIT)}
    # Sorted by name within each split, and the splits in one order: a glob, a brace pattern and
    # the directory of the same files are the same input, in the same row order.
    for path in sorted(files, key=lambda p: p.name):
        try:
            rows += pq.ParquetFile(path).metadata.num_rows  # reads the footer alone
        except _READ_ERRORS as e:
            raise ClipcapError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        by_split[_split_of_file(path.name)].append(str(path.resolve()))
    if rows == 0:
        raise ClipcapError(f"{source}: the Parquet files hold no rows")
    by_split = {name: paths for name, paths in by_split.items() if paths}
    # A Parquet file is one shard of its split: its name is how failures name its rows.
    file_names = {name: [Path(p).name for p in paths] for name, paths in by_split.items()}
    try:
        builder = datasets.load_dataset_builder("parquet", data_files=by_split)
        streamed = builder.as_streaming_dataset()
    except _READ_ERRORS as e:
        raise ClipcapError(f"{source}: cannot read the Parquet files ({_first_line(e)})") from None
    return list(streamed.items()), digest.hexdigest()[:16], file_names


def parquet_paths(source: str) -> list[Path]:
    """The Parquet files a file, brace pattern, glob or directory names, in order; all must exist."""
    directory = Path(source)
    if directory.is_dir():
        files = sorted(p for p in directory.rglob("*.parquet") if p.is_file())
        if not files:
            raise ClipcapError(f"{source} holds no *.parquet files")
        return files
    return pattern_paths(source, "Parquet file", "Parquet files")


def _split_of_file(name: str) -> str:
    """The split a Parquet file's name gives (`validation-00000.parquet` is val), else `rows`."""
    word = re.split(r"[-_.]", name.lower(), maxsplit=1)[0]
    word = SPLIT_ALIASES.get(word, word)
    return word if word in SPLITS else UNSPLIT


def _features(data, source: str) -> dict:
    features = data.features
    if features is None:  # a streamed dataset that does not declare them: read the first row
        try:
            features = data._resolve_features().features
        except _READ_ERRORS as e:
            raise ClipcapError(f"{source}: cannot read its columns ({_first_line(e)})") from None
    return dict(features)


def _columns(features: dict, given: dict, source: str) -> Columns:
    """The columns to read, from the names given or found; a missing one lists those there are."""
    existing = ", ".join(features) or "none"
    for role, name in given.items():
        if name is not None and name not in features:
            raise ClipcapError(
                f"{source} has no column '{name}' ({COLUMN_FLAGS[role]}); its columns are: "
                + existing
            )
    image = given.get("image") or next(
        (n for n, f in features.items() if type(f).__name__ == "Image"), None
    )
    image = image or next((n for n in IMAGE_NAMES if n in features), None)
    if image is None:
        raise ClipcapError(
            f"{source} has no image column (an Image feature, or one named "
            f"{'/'.join(IMAGE_NAMES)}); its columns are: {existing}; pass --image-column"
        )
    caption = given.get("caption") or next((n for n in CAPTION_NAMES if n in features), None)
    if caption is None:
        raise ClipcapError(
            f"{source} has no caption column (one named {'/'.join(CAPTION_NAMES)}); its "
            f"columns are: {existing}; pass --caption-column"
        )
    if not _holds_text(features[caption]):
        raise ClipcapError(
            f"{source}: column '{caption}' holds {features[caption]!r}, not text or a list of "
            f"texts; its columns are: {existing}; pass --caption-column"
        )
    split = given.get("split") or next((n for n in SPLIT_NAMES if n in features), None)
    image_id = given.get("image_id") or next((n for n in ID_NAMES if n in features), None)
    if image_id is not None and not _is_value(features[image_id], ID_DTYPES):
        # A float id is 1.0 for the 1 of the references (pandas makes an integer column with a
        # gap float), bytes print as b'..': every id would silently differ from its image's.
        raise ClipcapError(
            f"{source}: column '{image_id}' holds {features[image_id]!r}, not text or integers, "
            "so it cannot give image ids; pass --id-column with another column"
        )
    return Columns(image=image, caption=caption, split=split, image_id=image_id)


TEXT_DTYPES = ("string", "large_string")
ID_DTYPES = (*TEXT_DTYPES, *(f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)))


def _is_value(feature, dtypes: tuple[str, ...]) -> bool:
    """Whether a feature is a plain `Value` of one of some dtypes."""
    return type(feature).__name__ == "Value" and getattr(feature, "dtype", None) in dtypes


def _holds_text(feature) -> bool:
    """Whether a feature is a string, or a list of strings (or of `{"raw": str}` sentences).

    Only one level of list: a list of lists of strings is not a caption column.
    """
    if _is_value(feature, TEXT_DTYPES):
        return True
    inner = getattr(feature, "feature", None)
    if inner is None:
        return False
    if isinstance(inner, dict):
        return "raw" in inner and _is_value(inner["raw"], TEXT_DTYPES)
    return _is_value(inner, TEXT_DTYPES)


def _without_decoding(datasets, data, image_column: str):
    """The dataset with its Image column left as `{"bytes", "path"}`: workers decode the bytes."""
    feature = (data.features or {}).get(image_column)
    if type(feature).__name__ == "Image":
        return data.cast_column(image_column, datasets.Image(decode=False))
    return data


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def parse_row(
    row: dict, part: Part, position: int, columns: Columns, split_default: str, root: Path | None
):
    """A row's record and its image (bytes, or a file path); raises `ImageLoadError`."""
    where = part.where(position)
    value = row[columns.image]
    data, path = None, None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if not isinstance(data, bytes | bytearray | None) or not isinstance(path, str | None):
            raise ImageLoadError(
                f"column '{columns.image}' holds {{bytes: {type(data).__name__}, path: "
                f"{type(path).__name__}}}, not image bytes and a path"
            )
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str):
        path = value
    elif value is not None:
        raise ImageLoadError(f"column '{columns.image}' holds {type(value).__name__}, not an image")
    if data is None and not path:
        raise ImageLoadError("no image in the row")
    if path and NUL in path:
        raise ImageLoadError(f"the image path in column '{columns.image}' holds a NUL character")
    shown = _shown_path(path, root) if path else where
    captions = _captions(row[columns.caption], columns.caption)
    split_value = row[columns.split] if columns.split else None
    if split_value is None or not str(split_value).strip():
        split = part.split or split_default
    else:
        split = SPLIT_ALIASES.get(
            str(split_value).strip().lower(), str(split_value).strip().lower()
        )
        if split not in SPLITS:
            raise ImageLoadError(f"unknown split {split_value!r} in column '{columns.split}'")
    image_id = row[columns.image_id] if columns.image_id else None
    image_id = shown if image_id is None or str(image_id) == "" else str(image_id)
    if NUL in image_id:
        raise ImageLoadError(f"the image id in column '{columns.image_id}' holds a NUL character")
    record = ImageRecord(image_id=image_id, path=shown, split=split, captions=captions)
    if data is not None:
        return record, bytes(data)
    # A path with no bytes is a file on this machine: like an annotation file's, it must lie
    # under the image root (the dataset's folder, or --images).
    if root is None:
        raise ImageLoadError("the row has an image path but no image bytes; pass --images")
    file = (root / path).resolve()
    if not file.is_relative_to(root.resolve()):
        raise ImageLoadError(f"{path} is outside the image root {root}")
    return record, file


def _shown_path(path: str, root: Path | None) -> str:
    """An image path as the cache records it: relative to the source directory when inside it."""
    if root is not None and Path(path).is_absolute():
        try:
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return posixpath.normpath(path.replace("\\", "/"))


def _captions(value, column: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ImageLoadError(f"column '{column}' holds {type(value).__name__}, not text")
    captions = []
    for caption in value:
        if isinstance(caption, dict):  # Karpathy's sentences: {"raw": ..., "tokens": ...}
            caption = caption.get("raw")
        if caption is None:  # a null in the list: no caption, as a null instead of the list is
            continue
        if not isinstance(caption, str):
            raise ImageLoadError(f"column '{column}' holds a caption that is not text")
        if NUL in caption:
            raise ImageLoadError(f"column '{column}' holds a caption with a NUL character")
        if caption.strip():
            captions.append(caption.strip())
    return captions


class DatasetPartsDataset(torch.utils.data.IterableDataset):
    """Decoded, preprocessed batches of dataset parts, one part after another in each worker.

    DataLoader workers share the parts out (worker w reads every W-th), and each yields
    `ShardBatch`es of at most `batch_size` images of one part; the last batch of a part has
    `last=True`, even when it holds nothing, so the part can be written.
    """

    def __init__(
        self,
        parts: list[tuple[int, Part]],  # (progress shard number, part)
        columns: Columns,
        processor,
        batch_size: int,
        split: str = ALL,
        split_default: str = TRAIN,
        root: Path | None = None,
    ):
        self.parts = parts
        self.columns = columns
        self.processor = processor
        self.batch_size = batch_size
        self.split = split
        self.split_default = split_default
        self.root = root

    def __iter__(self) -> Iterator[ShardBatch]:
        worker = torch.utils.data.get_worker_info()
        parts = self.parts if worker is None else self.parts[worker.id :: worker.num_workers]
        for number, part in parts:
            yield from self._batches(number, part)

    def _rows(self, part: Part) -> Iterator[tuple[dict | None, str | None]]:
        """(row, None) for each row, then (None, reason) if the part could not be read to its end."""
        try:
            for row in part.rows(self.batch_size):
                yield row, None
        except _READ_ERRORS as e:
            yield None, f"unreadable data ({_first_line(e)})"

    def _batches(self, number: int, part: Part) -> Iterator[ShardBatch]:
        batch = ShardBatch(number)
        pixels = []
        for position, (row, failure) in enumerate(self._rows(part)):
            if failure is not None:
                batch.failures.append((part.where(position), failure))
                break
            try:
                record, image = parse_row(
                    row, part, position, self.columns, self.split_default, self.root
                )
            except ImageLoadError as e:
                batch.failures.append((part.where(position), str(e)))
                continue
            if self.split != ALL and record.split != self.split:
                continue
            if not record.captions:
                batch.uncaptioned += 1
                continue
            try:
                decoded = decode_image(image) if isinstance(image, bytes) else load_image(image)
                pixel_values = self.processor(images=decoded, return_tensors="pt")["pixel_values"]
            except ImageLoadError as e:
                batch.failures.append((record.path, str(e)))
                continue
            batch.records.append(record)
            pixels.append(pixel_values[0])
            if len(pixels) == self.batch_size:
                batch.pixel_values = torch.stack(pixels)
                yield batch
                batch, pixels = ShardBatch(number), []
        batch.pixel_values = torch.stack(pixels) if pixels else None
        batch.last = True
        yield batch
