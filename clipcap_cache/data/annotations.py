"""Readers for image-caption annotation files.

Four formats are understood, each turned into the same list of `ImageRecord`s, one per image, in
the order the file lists them:

- `coco`: the official `captions_*.json`, `{"images": [{id, file_name}], "annotations":
  [{image_id, caption}]}`. The split is an image's optional `split` key, else taken from the file
  name (`captions_val2014.json` is val), else train.
- `karpathy`: `dataset_coco.json` (or flickr8k/30k), `{"images": [{filepath, filename, cocoid,
  split, sentences: [{raw}]}]}`. The split `restval` counts as train.
- `jsonl` / `csv`: custom data with `image` (a path relative to the image root), `caption` and an
  optional `split` column. Several rows may name the same image.

`read_annotations(path, "auto")` detects the format from the content. Each format is parsed by its
own rules: CSV by the `csv` module (quoted fields may hold newlines), JSON lines split at line
feeds only. Captions must be strings; empty ones are dropped, and `without_captions` finds the
images left with none. Image paths are normalised and must stay inside the image root.
"""

import csv
import hashlib
import io
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import os_errors, parse_json, require_file

FORMATS = ("auto", "coco", "karpathy", "jsonl", "csv")
TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)
ALL = "all"  # chooses every split where one split can be chosen
SPLIT_CHOICES = (*SPLITS, ALL)
SPLIT_ALIASES = {"restval": TRAIN, "validation": VAL, "valid": VAL, "dev": VAL}


@dataclass
class ImageRecord:
    """One image and all of its reference captions."""

    image_id: str  # the COCO id, or the relative path for custom data
    path: str  # relative to the image root
    split: str  # train, val or test
    captions: list[str] = field(default_factory=list)


def fingerprint(path: str | Path) -> str:
    """A short content hash of a file, used to tell whether a cache came from this file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_annotations(path: str | Path, format: str = "auto") -> list[ImageRecord]:
    """Read an annotation file into image records; raises `ClipcapError` on malformed input."""
    path = Path(path)
    if format not in FORMATS:
        raise ClipcapError(f"unknown annotation format '{format}': choose one of {FORMATS}")
    require_file(path, "annotation file")
    with os_errors(f"cannot read {path}"):
        try:
            # newline="" keeps line ends as they are: CSV quoting and JSON lines define their own.
            with open(path, encoding="utf-8-sig", newline="") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ClipcapError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    if format == "auto":
        format = detect_format(path, text)
    readers = {
        "coco": _read_coco,
        "karpathy": _read_karpathy,
        "jsonl": _read_jsonl,
        "csv": _read_csv,
    }
    records = readers[format](path, text)
    if not records:
        raise ClipcapError(f"{path}: no images found in the annotation file")
    _check_records(path, records)
    return records


def _check_records(path: Path, records: list[ImageRecord]) -> None:
    """Refuse, before any image is read, what the cache could not hold or would get wrong.

    Two records of one id would become two cache rows that evaluation merges into one image, and
    HDF5 text cannot hold a NUL character.
    """
    first_path: dict[str, str] = {}
    for record in records:
        if record.image_id in first_path:
            raise ClipcapError(
                f"{path}: image id {record.image_id!r} is given twice ({first_path[record.image_id]}"
                f" and {record.path}); every image needs an id of its own, with all its captions"
            )
        first_path[record.image_id] = record.path
        if any("\x00" in text for text in (record.image_id, record.path, *record.captions)):
            raise ClipcapError(
                f"{path}: image {record.image_id!r} ({record.path}) has a NUL character in its id, "
                "path or captions, which the feature cache cannot store"
            )


def detect_format(path: Path, text: str) -> str:
    """Guess the annotation format from the file's content."""
    stripped = text.lstrip()
    if not stripped:
        raise ClipcapError(f"{path}: the annotation file is empty")
    if stripped[0] in "{[":
        try:
            data = parse_json(text, str(path))
        except ClipcapError:
            data = None  # may still be JSON lines
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            if "annotations" in data:
                return "coco"
            first = data["images"][0] if data["images"] else {}
            if isinstance(first, dict) and "sentences" in first:
                return "karpathy"
        single_row = isinstance(data, dict) and "image" in data  # JSON lines with one row
        if data is not None and not single_row:
            raise ClipcapError(
                f"{path}: unknown JSON annotation format: expected COCO ('images' and 'annotations') "
                "or Karpathy ('images' with 'sentences'); pass --format to choose one"
            )
        first_line = stripped.split("\n", 1)[0]
        row = parse_json(first_line, f"{path} (neither JSON nor JSON lines)", 1)
        if isinstance(row, dict) and "image" in row:
            return "jsonl"
        raise ClipcapError(f"{path}: JSON lines rows need 'image' and 'caption' keys")
    try:
        header = next(csv.reader(io.StringIO(stripped, newline="")))
    except csv.Error as e:
        raise ClipcapError(f"{path}: not a valid CSV header ({e})") from None
    if "image" in header and "caption" in header:
        return "csv"
    raise ClipcapError(
        f"{path}: unknown annotation format: not COCO or Karpathy JSON, JSON lines, or a CSV with "
        "'image' and 'caption' columns"
    )


def _load_json(path: Path, text: str) -> dict:
    data = parse_json(text, str(path))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ClipcapError(f"{path}: expected a JSON object with an 'images' list")
    return data


def _get(entry: object, key: str, where: str, path: Path):
    if not isinstance(entry, dict) or key not in entry:
        raise ClipcapError(f"{path}: {where} has no '{key}' key")
    return entry[key]


def _caption(value: object, where: str, path: Path) -> str | None:
    """A caption with its outer whitespace stripped; None for an empty one, an error for a non-string."""
    if not isinstance(value, str):
        raise ClipcapError(
            f"{path}: {where} has a caption that is not a string ({type(value).__name__})"
        )
    return value.strip() or None


def _relative_path(value: object, where: str, path: Path) -> str:
    """An image path normalised (`./a/../b.jpg` is `b.jpg`), refused if it leaves the image root."""
    if not isinstance(value, str) or not value.strip():
        raise ClipcapError(f"{path}: {where} has no image path (found {value!r})")
    normal = posixpath.normpath(value.strip().replace("\\", "/"))
    drive = normal[1:2] == ":"  # C:/x on Windows
    if posixpath.isabs(normal) or drive or normal == ".." or normal.startswith("../"):
        raise ClipcapError(
            f"{path}: {where} names {value!r}, which is outside the image root; image paths "
            "must be relative to --images and stay inside it"
        )
    return normal


def without_captions(records: list[ImageRecord]) -> list[ImageRecord]:
    """The records that have no caption: nothing to train on or score against."""
    return [r for r in records if not r.captions]


def _normalize_split(value: object, where: str, path: Path) -> str:
    split = SPLIT_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if split not in SPLITS:
        raise ClipcapError(f"{path}: {where} has unknown split '{value}' (expected {SPLITS})")
    return split


def _split_from_name(path: Path) -> str:
    name = path.name.lower()
    for split in SPLITS:
        if split in name:
            return split
    return TRAIN


def _read_coco(path: Path, text: str) -> list[ImageRecord]:
    data = _load_json(path, text)
    if not isinstance(data.get("annotations"), list):
        raise ClipcapError(f"{path}: COCO format needs an 'annotations' list")
    default_split = _split_from_name(path)
    records: dict[str, ImageRecord] = {}
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        image_id = str(_get(image, "id", where, path))
        split = image.get("split")
        if image_id in records:
            raise ClipcapError(
                f"{path}: {where} repeats image id {image_id}; every image needs an id of its own"
            )
        records[image_id] = ImageRecord(
            image_id=image_id,
            path=_relative_path(_get(image, "file_name", where, path), where, path),
            split=default_split if split is None else _normalize_split(split, where, path),
        )
    for i, annotation in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        image_id = str(_get(annotation, "image_id", where, path))
        caption = _get(annotation, "caption", where, path)
        if image_id not in records:
            raise ClipcapError(
                f"{path}: {where} names image_id {image_id}, which is not in 'images'"
            )
        caption = _caption(caption, where, path)
        if caption is not None:
            records[image_id].captions.append(caption)
    return list(records.values())


def _read_karpathy(path: Path, text: str) -> list[ImageRecord]:
    data = _load_json(path, text)
    records = []
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        filename = _get(image, "filename", where, path)
        folder = image.get("filepath") or ""
        if not isinstance(filename, str) or not isinstance(folder, str):
            raise ClipcapError(f"{path}: {where} has a 'filename' or 'filepath' that is not text")
        image_id = image.get("cocoid", image.get("imgid", filename))
        sentences = _get(image, "sentences", where, path)
        if not isinstance(sentences, list):
            raise ClipcapError(f"{path}: {where}.sentences is not a list")
        captions = [
            _caption(
                _get(s, "raw", f"{where}.sentences[{j}]", path), f"{where}.sentences[{j}]", path
            )
            for j, s in enumerate(sentences)
        ]
        records.append(
            ImageRecord(
                image_id=str(image_id),
                path=_relative_path(f"{folder}/{filename}" if folder else filename, where, path),
                split=_normalize_split(_get(image, "split", where, path), where, path),
                captions=[c for c in captions if c is not None],
            )
        )
    return records


def _records_from_rows(path: Path, rows) -> list[ImageRecord]:
    records: dict[str, ImageRecord] = {}
    for where, row in rows:
        image = _relative_path(_get(row, "image", where, path), where, path)
        caption = _caption(_get(row, "caption", where, path), where, path)
        split_value = row.get("split") or TRAIN
        split = _normalize_split(split_value, where, path)
        record = records.setdefault(image, ImageRecord(image_id=image, path=image, split=split))
        if record.split != split:
            raise ClipcapError(
                f"{path}: {where} puts {image} in split '{split}', "
                f"but an earlier row put it in '{record.split}'"
            )
        if caption is not None:
            record.captions.append(caption)
    return list(records.values())


def _read_jsonl(path: Path, text: str) -> list[ImageRecord]:
    def rows():
        # JSON lines are separated by \n alone; a JSON string may hold U+2028 and the like.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            yield f"line {number}", parse_json(line, str(path), number)

    return _records_from_rows(path, rows())


def _read_csv(path: Path, text: str) -> list[ImageRecord]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames or []
        for column in ("image", "caption"):
            if column not in columns:
                raise ClipcapError(f"{path}: CSV needs an '{column}' column (found {columns})")
        # A quoted field may span lines, so rows are named by the line they start on.
        rows = []
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise ClipcapError(f"{path}: line {start} has more fields than the header")
            rows.append((f"line {start}", row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ClipcapError(f"{path}: malformed CSV near line {reader.line_num} ({e})") from None
    return _records_from_rows(path, rows)


def select_split(records: list[ImageRecord], split: str) -> list[ImageRecord]:
    """Keep the records of one split, or all of them for `all`."""
    if split == ALL:
        return list(records)
    if split not in SPLITS:
        raise ClipcapError(f"unknown split '{split}': choose train, val, test or all")
    return [r for r in records if r.split == split]
