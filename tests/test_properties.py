"""Property tests of the input boundary: anything a user can feed in either works or gets our error.

Hypothesis generates the inputs: arbitrary text and bytes for each annotation format, captions of
any text written the way each format defines, arbitrary JSON values for every config field, tar
shards of arbitrary members (names, contents, truncation), brace patterns, arbitrary text in
every form field of the server, and Parquet files of hostile rows for the datasets input.
"""

import contextlib
import csv
import io
import json
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clipcap_cache.data.annotations import FORMATS, read_annotations
from clipcap_cache.errors import ClipcapError
from clipcap_cache.extraction.features import FeatureConfig
from clipcap_cache.inference.generate import DecodeConfig
from clipcap_cache.inference.serve import ServeConfig
from clipcap_cache.model import ModelConfig
from clipcap_cache.training.config import TrainConfig

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


def read_file(content: bytes, name: str, format: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        return read_annotations(path, format)


def records_or_our_error(content: bytes, name: str, format: str):
    try:
        records = read_file(content, name, format)
    except ClipcapError:
        return None
    assert records and all(isinstance(c, str) for r in records for c in r.captions)
    return records


@FAST
@given(text=st.text(max_size=300), format=st.sampled_from(FORMATS))
def test_any_text_gives_records_or_our_error(text, format):
    records_or_our_error(text.encode("utf-8"), "annotations.txt", format)


@FAST
@given(data=st.binary(max_size=300), format=st.sampled_from(FORMATS))
def test_any_bytes_give_records_or_our_error(data, format):
    records_or_our_error(data, "annotations.bin", format)


image_names = st.from_regex(r"[a-z0-9_]{1,8}(/[a-z0-9_]{1,8})?\.(png|jpg)", fullmatch=True)
# Any text but NUL (refused on reading: the cache cannot hold it), with the characters that
# line-based parsing gets wrong made common.
TRICKY = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\r\n\t,\"'"
captions = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00") | st.sampled_from(TRICKY),
    min_size=1,
    max_size=40,
).filter(lambda c: c.strip())
rows = st.lists(st.tuples(image_names, captions), min_size=1, max_size=8)


def expected_captions(pairs):
    """Captions per image in first-seen order, stripped, as every reader returns them."""
    grouped: dict[str, list[str]] = {}
    for image, caption in pairs:
        grouped.setdefault(image, []).append(caption.strip())
    return grouped


@FAST
@given(pairs=rows)
def test_captions_round_trip_through_csv(pairs):
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["image", "caption"])
    writer.writerows(pairs)
    records = read_file(buffer.getvalue().encode("utf-8"), "a.csv", "csv")
    assert {r.path: r.captions for r in records} == expected_captions(pairs)


@FAST
@given(pairs=rows, ascii_only=st.booleans())
def test_captions_round_trip_through_json_lines(pairs, ascii_only):
    text = "".join(
        json.dumps({"image": i, "caption": c}, ensure_ascii=ascii_only) + "\n" for i, c in pairs
    )
    records = read_file(text.encode("utf-8"), "a.jsonl", "auto")
    assert {r.path: r.captions for r in records} == expected_captions(pairs)


@FAST
@given(pairs=rows)
def test_captions_round_trip_through_coco_and_karpathy_json(pairs):
    grouped = expected_captions(pairs)
    names = list(grouped)
    coco = {
        "images": [{"id": n, "file_name": name} for n, name in enumerate(names)],
        "annotations": [{"image_id": names.index(i), "caption": c} for i, c in pairs],
    }
    records = read_file(json.dumps(coco).encode(), "captions_train.json", "auto")
    assert {r.path: r.captions for r in records} == grouped
    karpathy = {
        "images": [
            {
                "filename": name,
                "split": "train",
                "sentences": [{"raw": c} for i, c in pairs if i == name],
            }
            for name in names
        ]
    }
    records = read_file(json.dumps(karpathy).encode(), "dataset.json", "auto")
    assert {r.path: r.captions for r in records} == grouped


REQUIRED = {
    TrainConfig: {"features": "f.h5", "out": "run"},
    ModelConfig: {},
    FeatureConfig: {"annotations": "a.json", "images": "images", "out": "f.h5"},
    DecodeConfig: {},
    ServeConfig: {"checkpoint": "run"},
}
CASES = [(cls, f.name) for cls in REQUIRED for f in fields(cls)]


@pytest.mark.parametrize("cls, name", CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
@settings(max_examples=25, deadline=None)
@given(value=json_values)
def test_any_json_value_builds_a_config_or_gets_our_error(cls, name, value):
    try:
        config = cls(**{**REQUIRED[cls], name: value})
    except ClipcapError as e:
        assert "\n" not in str(e)
        return
    assert getattr(config, name) == value


# ---------------------------------------------------------------- tar shards (WebDataset)

member_names = st.from_regex(
    r"(\.?[a-z0-9]{0,3}/)?[a-z0-9.]{0,4}\.(png|jpg|txt|json|JSON|cls|tar)?", fullmatch=True
)
member_data = st.binary(max_size=64) | st.sampled_from(
    [b'{"captions": ["a", 1]}', b'{"caption": "x", "split": "dev"}', b"[]", b"\xff\xfe", b"ok"]
)


@FAST
@given(
    members=st.lists(st.tuples(member_names, member_data), max_size=8),
    cut=st.integers(min_value=0, max_value=4096),
)
def test_any_tar_gives_samples_or_recorded_failures(members, cut):
    import tarfile

    from clipcap_cache.data.images import ImageLoadError, decode_image
    from clipcap_cache.data.webdataset import parse_sample, read_samples

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name or "x")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    content = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder) / "00000.tar"
        shard.write_bytes(content[: len(content) - cut] if cut < len(content) else content)
        for sample in read_samples(shard):
            if sample.failure is not None:
                assert "tar" in sample.failure
                continue
            try:
                record = parse_sample(sample, "train")
            except ImageLoadError as e:
                assert str(e) and "\n" not in str(e)
                continue
            assert record.image_id == sample.key and record.split in ("train", "val", "test")
            assert all(isinstance(c, str) and c == c.strip() and c for c in record.captions)
            extension = sample.image_extension()
            if extension is not None:
                with contextlib.suppress(ImageLoadError):  # any other exception fails
                    decode_image(sample.members[extension])


brace_patterns = st.text(alphabet=st.sampled_from(list("{},.\\ab09-Z")), max_size=16)


@settings(max_examples=1000, deadline=None)
@given(pattern=brace_patterns)
def test_brace_counts_equal_the_expansion(pattern):
    from braceexpand import UnbalancedBracesError, braceexpand

    from clipcap_cache.data.webdataset import count_brace_names

    try:
        expected = len(list(braceexpand(pattern)))
    except UnbalancedBracesError:
        with pytest.raises(UnbalancedBracesError):
            count_brace_names(pattern)
        return
    assert count_brace_names(pattern) == expected


# ---------------------------------------------------------------- the server's form fields

FORM_FIELDS = (
    "beams",
    "greedy",
    "sample",
    "num_captions",
    "max_tokens",
    "top_p",
    "temperature",
    "seed",
)
form_values = st.text(max_size=12) | st.sampled_from(
    ["0", "-1", "1", "2", "1e-300", "1e308", "nan", "inf", "true", "false", str(2**64), "٣", "²"]
)


@pytest.fixture(scope="module")
def form_client(captioner, trained_run):
    from fastapi.testclient import TestClient

    from clipcap_cache.inference.serve import create_app

    config = ServeConfig(str(trained_run), max_caption_tokens=8)
    with TestClient(create_app(captioner, config), base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture(scope="module")
def form_png(shapes):
    return sorted((shapes[1] / "images").iterdir())[0].read_bytes()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(fields=st.dictionaries(st.sampled_from(FORM_FIELDS), form_values, max_size=4))
def test_any_form_fields_get_captions_or_one_line_422(form_client, form_png, fields):
    reply = form_client.post(
        "/caption", files=[("images", ("a.png", form_png, "image/png"))], data=fields
    )
    assert reply.status_code in (200, 422), (fields, reply.text)
    if reply.status_code == 422:
        detail = reply.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail
    else:
        assert reply.json()["results"][0]["captions"]


# ------------------------------------------------------------------ Parquet rows

# Valid kinds come up more often than hostile ones, so that about half the tables give a cache.
PARQUET_IMAGE_KINDS = (*["struct"] * 3, *["binary"] * 2, *["path"] * 2, "odd struct", "int")
PARQUET_CAPTION_KINDS = (
    *["string"] * 3,
    *["list"] * 3,
    *["raw"] * 2,
    *("large_string", "nested", "int", "null"),
)
PARQUET_ID_KINDS = (
    *[None] * 3,
    *["string"] * 3,
    *["int64"] * 2,
    *("uint64", "float64", "binary", "bool"),
)


def _png(colour) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


PNGS = (_png((255, 0, 0)), _png((0, 0, 255)))
INT64 = st.integers(-(2**63), 2**63 - 1)
good_texts = st.sampled_from(["a dog", "a red square", " a cat "]) | st.text(min_size=1, max_size=8)
any_texts = good_texts | st.none() | st.sampled_from(["", "  ", "nul\x00"])
good_paths = st.sampled_from(["img0.png", "img1.png", "d/../img1.png"])
any_paths = (
    good_paths
    | st.none()
    | st.sampled_from(["", "missing.png", "junk.png", "../img0.png", "nul\x00.png", "d"])
    | st.sampled_from(["/etc/passwd", "\\back\\slash.png"])
    | st.text(max_size=6)
)
any_bytes = (
    st.sampled_from(PNGS) | st.none() | st.sampled_from([b"", b"not an image"]) | st.binary()
)
good_splits = st.sampled_from(["train", "val", "test", "validation", " TRAIN ", ""]) | st.none()
# Per column and kind: (values of a row that is valid, any values at all). A table mixes rows of
# both, so that valid rows sit among hostile ones, where a wrong result would show.
PARQUET_VALUES = {
    "image": {
        "struct": (
            st.fixed_dictionaries({"bytes": st.sampled_from(PNGS), "path": st.none() | any_paths})
            | st.fixed_dictionaries({"bytes": st.none(), "path": good_paths}),
            st.none() | st.fixed_dictionaries({"bytes": any_bytes, "path": any_paths}),
        ),
        "odd struct": (
            st.nothing(),
            st.none()
            | st.fixed_dictionaries({"bytes": st.none() | st.text(max_size=4), "path": INT64}),
        ),
        "binary": (st.sampled_from(PNGS), any_bytes),
        "path": (good_paths, any_paths),
        "int": (st.nothing(), st.none() | INT64),
    },
    "caption": {
        "string": (good_texts, any_texts),
        "large_string": (good_texts, any_texts),
        "list": (
            st.lists(good_texts, min_size=1, max_size=3),
            st.none() | st.lists(any_texts, max_size=3),
        ),
        "raw": (
            st.lists(st.fixed_dictionaries({"raw": good_texts}), min_size=1, max_size=3),
            st.none() | st.lists(st.none() | st.fixed_dictionaries({"raw": any_texts}), max_size=3),
        ),
        "nested": (st.nothing(), st.none() | st.lists(st.none() | st.lists(any_texts), max_size=2)),
        "int": (st.nothing(), st.none() | INT64),
        "null": (st.nothing(), st.none()),
    },
    "image_id": {
        "string": (
            st.text(min_size=1, max_size=8),
            st.none() | st.sampled_from(["1", "²", "", "\x00"]) | st.text(max_size=8),
        ),
        "int64": (INT64, st.none() | st.sampled_from([0, 1]) | INT64),
        "uint64": (st.nothing(), st.none() | st.integers(0, 2**64 - 1)),
        "float64": (st.nothing(), st.none() | st.floats()),
        "binary": (st.nothing(), st.none() | st.binary(max_size=4)),
        "bool": (st.nothing(), st.none() | st.booleans()),
    },
    "split": (good_splits, good_splits | st.sampled_from(["bogus"]) | st.text(max_size=3)),
}


def _arrow_type(column: str, kind: str):
    import pyarrow as pa

    return {
        ("image", "struct"): pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        ("image", "odd struct"): pa.struct([("bytes", pa.string()), ("path", pa.int64())]),
        ("image", "binary"): pa.binary(),
        ("image", "path"): pa.string(),
        ("image", "int"): pa.int64(),
        ("caption", "string"): pa.string(),
        ("caption", "large_string"): pa.large_string(),
        ("caption", "list"): pa.list_(pa.string()),
        ("caption", "raw"): pa.list_(pa.struct([("raw", pa.string())])),
        ("caption", "nested"): pa.list_(pa.list_(pa.string())),
        ("caption", "int"): pa.int64(),
        ("caption", "null"): pa.null(),
        ("image_id", "string"): pa.string(),
        ("image_id", "int64"): pa.int64(),
        ("image_id", "uint64"): pa.uint64(),
        ("image_id", "float64"): pa.float64(),
        ("image_id", "binary"): pa.binary(),
        ("image_id", "bool"): pa.bool_(),
        ("split", "string"): pa.string(),
    }[column, kind]


@st.composite
def parquet_tables(draw):
    """Column kinds, and 1 to 6 rows of values of those kinds: valid ones among hostile ones."""
    kinds = {
        "image": draw(st.sampled_from(PARQUET_IMAGE_KINDS)),
        "caption": draw(st.sampled_from(PARQUET_CAPTION_KINDS)),
        "image_id": draw(st.sampled_from(PARQUET_ID_KINDS)),
        "split": draw(st.sampled_from((None, "string"))),
    }
    kinds = {column: kind for column, kind in kinds.items() if kind is not None}
    choices = {
        column: PARQUET_VALUES[column] if column == "split" else PARQUET_VALUES[column][kind]
        for column, kind in kinds.items()
    }
    # A valid value where every column of the kind has one, else any value.
    good = {column: valid | hostile if valid.is_empty else valid for column, (valid, hostile)
            in choices.items()}  # fmt: skip
    hostile = {column: values for column, (_, values) in choices.items()}
    rows = draw(st.lists(st.fixed_dictionaries(good), min_size=1, max_size=3))
    rows += draw(st.lists(st.fixed_dictionaries(hostile), max_size=3))
    return kinds, draw(st.permutations(rows))


def _expected_captions(value, kind):
    """A row's captions as the README defines them, or None where the value is not text."""
    if value is None:
        return []
    texts = [value] if isinstance(value, str) else value
    if kind == "raw":
        texts = [None if entry is None else entry["raw"] for entry in texts]
    if any(text is not None and (not isinstance(text, str) or "\x00" in text) for text in texts):
        return None  # not text, or a text HDF5 cannot store
    return [text.strip() for text in texts if text is not None and text.strip()]


def _expected_image(value, kind, root):
    """(the image's index in PNGS or None where it does not decode, its path) or None: no image."""
    data = path = None
    if kind == "odd struct" and value is not None:
        if value["bytes"] is None and value["path"] is None:
            return None
        return "wrong type"
    if kind == "struct" and value is not None:
        data, path = value["bytes"], value["path"]
    elif kind == "binary":
        data = value
    elif kind == "path":
        path = value
    elif value is not None:
        return "wrong type"
    if data is None and not path:
        return None
    if path and "\x00" in path:
        return "wrong type"  # a text HDF5 cannot store
    if data is not None:
        return (PNGS.index(data) if data in PNGS else None), path
    try:
        file = (root / path).resolve()
    except (ValueError, OSError):
        return None, path
    names = {(root / f"img{i}.png").resolve(): i for i in range(len(PNGS))}
    return names.get(file), path


def _expected_rows(kinds, rows, root):
    """The cache rows the table must give: (image id, split, captions, PNG index); or None: one
    error line. Follows the README's definition of each column."""
    import posixpath

    from clipcap_cache.data.annotations import SPLIT_ALIASES, SPLITS

    if kinds["caption"] in ("nested", "int", "null"):
        return None  # the column is not text, nor a list of texts
    if kinds.get("image_id") in ("float64", "binary", "bool"):
        return None  # image ids are text or integers
    kept = []
    for position, row in enumerate(rows):
        image = _expected_image(row["image"], kinds["image"], root)
        captions = _expected_captions(row["caption"], kinds["caption"])
        if image is None or image == "wrong type" or captions is None:
            continue  # a recorded failure
        split_value = row.get("split")
        split = "train"
        if split_value is not None and split_value.strip():
            split = SPLIT_ALIASES.get(split_value.strip().lower(), split_value.strip().lower())
            if split not in SPLITS:
                continue
        index, path = image
        shown = posixpath.normpath(path.replace("\\", "/")) if path else f"rows.parquet/{position}"
        if path and Path(path).is_absolute():
            with contextlib.suppress(ValueError):
                shown = Path(path).resolve().relative_to(root.resolve()).as_posix()
        image_id = row.get("image_id")
        image_id = shown if image_id is None or str(image_id) == "" else str(image_id)
        if "\x00" in image_id:
            continue
        if captions and index is not None:
            kept.append((image_id, split, captions, index))
    ids = [row[0] for row in kept]
    if not kept or len(set(ids)) < len(ids):
        return None  # nothing to write, or one image id twice
    return kept


@pytest.fixture(scope="module")
def png_embeddings(clip_dir, tmp_path_factory):
    """The tiny CLIP's embedding of each of PNGS (and a datasets cache of this module's own)."""
    datasets = pytest.importorskip("datasets")
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("hf-cache"))
    from clipcap_cache.data.images import decode_image
    from clipcap_cache.extraction.encoder import load_clip

    encoder = load_clip(str(clip_dir), "cpu")
    pixels = encoder.processor(images=[decode_image(p) for p in PNGS], return_tensors="pt")
    yield encoder.encode(pixels["pixel_values"]).numpy()
    datasets.config.HF_DATASETS_CACHE = saved


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(table=parquet_tables())
def test_any_parquet_rows_give_their_valid_rows_or_one_error(clip_dir, png_embeddings, table):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipcap_cache.data.cache import read_cache
    from clipcap_cache.extraction.features import extract_features

    kinds, rows = table
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "images"
        (root / "d").mkdir(parents=True)
        for i, png in enumerate(PNGS):
            (root / f"img{i}.png").write_bytes(png)
        (root / "junk.png").write_bytes(b"junk")
        columns = {
            column: pa.array([row[column] for row in rows], type=_arrow_type(column, kind))
            for column, kind in kinds.items()
        }
        pq.write_table(pa.table(columns), tmp / "rows.parquet")
        expected = _expected_rows(kinds, rows, root)
        config = FeatureConfig(
            annotations=str(tmp / "rows.parquet"),
            images=str(root),
            out=str(tmp / "out.h5"),
            clip_model=str(clip_dir),
            num_workers=0,
            device="cpu",
            dtype="float32",
        )
        try:
            extract_features(config)
        except ClipcapError as e:
            event(f"error: {str(e).split(':')[-1][:30]}")
            assert "\n" not in str(e) and str(e)
            assert expected is None, (kinds, rows, str(e))
            assert not (tmp / "out.h5").exists()
            return
        assert expected is not None, (kinds, rows)
        event(f"a cache of {len(expected)} rows")
        cache = read_cache(tmp / "out.h5")
        assert cache.image_ids == [row[0] for row in expected]
        assert cache.splits.tolist() == [row[1] for row in expected]
        assert cache.references() == [row[2] for row in expected]
        np.testing.assert_allclose(
            cache.embeddings, png_embeddings[[row[3] for row in expected]], atol=1e-4
        )
