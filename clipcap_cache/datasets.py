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

`read_annotations(path, "auto")` detects the format from the content.
"""

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from clipcap_cache.errors import ClipcapError

FORMATS = ("auto", "coco", "karpathy", "jsonl", "csv")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"restval": "train", "validation": "val", "valid": "val", "dev": "val"}


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
    if not path.is_file():
        raise ClipcapError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
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
    return records


def detect_format(path: Path, text: str) -> str:
    """Guess the annotation format from the file's content."""
    stripped = text.lstrip()
    if not stripped:
        raise ClipcapError(f"{path}: the annotation file is empty")
    if stripped[0] in "{[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # may still be JSON lines
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            if "annotations" in data:
                return "coco"
            first = data["images"][0] if data["images"] else {}
            if isinstance(first, dict) and "sentences" in first:
                return "karpathy"
        if data is not None:
            raise ClipcapError(
                f"{path}: unknown JSON annotation format: expected COCO ('images' and 'annotations') "
                "or Karpathy ('images' with 'sentences'); pass --format to choose one"
            )
        first_line = stripped.splitlines()[0]
        try:
            row = json.loads(first_line)
        except json.JSONDecodeError as e:
            raise ClipcapError(f"{path}: not valid JSON or JSON lines ({e})") from None
        if isinstance(row, dict) and "image" in row:
            return "jsonl"
        raise ClipcapError(f"{path}: JSON lines rows need 'image' and 'caption' keys")
    header = next(csv.reader([stripped.splitlines()[0]]))
    if "image" in header and "caption" in header:
        return "csv"
    raise ClipcapError(
        f"{path}: unknown annotation format: not COCO or Karpathy JSON, JSON lines, or a CSV with "
        "'image' and 'caption' columns"
    )


def _load_json(path: Path, text: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClipcapError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ClipcapError(f"{path}: expected a JSON object with an 'images' list")
    return data


def _get(entry: object, key: str, where: str, path: Path):
    if not isinstance(entry, dict) or key not in entry:
        raise ClipcapError(f"{path}: {where} has no '{key}' key")
    return entry[key]


def _normalize_split(value: object, where: str, path: Path) -> str:
    split = SPLIT_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if split not in SPLITS:
        raise ClipcapError(f"{path}: {where} has unknown split '{value}' (expected {SPLITS})")
    return split


def _split_from_name(path: Path) -> str:
    name = path.name.lower()
    for split in ("train", "val", "test"):
        if split in name:
            return split
    return "train"


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
        records[image_id] = ImageRecord(
            image_id=image_id,
            path=str(_get(image, "file_name", where, path)),
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
        records[image_id].captions.append(str(caption).strip())
    return list(records.values())


def _read_karpathy(path: Path, text: str) -> list[ImageRecord]:
    data = _load_json(path, text)
    records = []
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        filename = _get(image, "filename", where, path)
        folder = image.get("filepath", "")
        image_id = image.get("cocoid", image.get("imgid", filename))
        sentences = _get(image, "sentences", where, path)
        if not isinstance(sentences, list):
            raise ClipcapError(f"{path}: {where}.sentences is not a list")
        captions = [
            str(_get(s, "raw", f"{where}.sentences[{j}]", path)).strip()
            for j, s in enumerate(sentences)
        ]
        records.append(
            ImageRecord(
                image_id=str(image_id),
                path=f"{folder}/{filename}" if folder else str(filename),
                split=_normalize_split(_get(image, "split", where, path), where, path),
                captions=captions,
            )
        )
    return records


def _records_from_rows(path: Path, rows) -> list[ImageRecord]:
    records: dict[str, ImageRecord] = {}
    for where, row in rows:
        image = str(_get(row, "image", where, path)).strip()
        caption = _get(row, "caption", where, path)
        if not image:
            raise ClipcapError(f"{path}: {where} has an empty 'image'")
        split_value = row.get("split") or "train"
        split = _normalize_split(split_value, where, path)
        record = records.setdefault(image, ImageRecord(image_id=image, path=image, split=split))
        if record.split != split:
            raise ClipcapError(
                f"{path}: {where} puts {image} in split '{split}', "
                f"but an earlier row put it in '{record.split}'"
            )
        if caption is not None and str(caption).strip():
            record.captions.append(str(caption).strip())
    return list(records.values())


def _read_jsonl(path: Path, text: str) -> list[ImageRecord]:
    def rows():
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ClipcapError(f"{path}: line {number} is not valid JSON ({e.msg})") from None

    return _records_from_rows(path, rows())


def _read_csv(path: Path, text: str) -> list[ImageRecord]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    for column in ("image", "caption"):
        if column not in columns:
            raise ClipcapError(f"{path}: CSV needs an '{column}' column (found {columns})")
    return _records_from_rows(path, ((f"row {i + 2}", row) for i, row in enumerate(reader)))


def select_split(records: list[ImageRecord], split: str) -> list[ImageRecord]:
    """Keep the records of one split, or all of them for `all`."""
    if split == "all":
        return list(records)
    if split not in SPLITS:
        raise ClipcapError(f"unknown split '{split}': choose train, val, test or all")
    return [r for r in records if r.split == split]
