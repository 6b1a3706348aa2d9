"""Property tests of the input boundary: anything a user can feed in either works or gets our error.

Hypothesis generates the inputs: arbitrary text and bytes for each annotation format, captions of
any text written the way each format defines, arbitrary JSON values for every config field, tar
shards of arbitrary members (names, contents, truncation), brace patterns, and arbitrary text in
every form field of the server.
"""

import contextlib
import csv
import io
import json
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
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
# Any text, with the characters that line-based parsing gets wrong made common.
TRICKY = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\r\n\t,\"'"
captions = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from(TRICKY), min_size=1, max_size=40
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
