"""JSON inputs of every kind are read by one reader, and every way they can fail is one line."""

import json
import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from clipcap_cache.data.annotations import read_annotations
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import read_json

DEEP = "[" * 100_000 + "]" * 100_000
LONG_NUMBER = "[" + "9" * 5000 + "]"


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize(
    "text, message",
    [
        (DEEP, "nested too deeply"),
        (LONG_NUMBER, "not readable JSON"),
        ("{", "not valid JSON"),
    ],
    ids=["nested 100k deep", "a 5000-digit integer", "malformed"],
)
def test_json_that_python_cannot_parse_is_one_line(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(ClipcapError, match=message):
        read_json(path)


@pytest.mark.bad_input("message")
def test_a_byte_order_mark_is_allowed(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"image_id": 1, "caption": "a"}]).encode())
    assert read_json(path) == [{"image_id": 1, "caption": "a"}]


@pytest.mark.bad_input("traceback")
def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)  # reading it would wait for a writer for ever
    with pytest.raises(ClipcapError, match="not a regular file"):
        read_json(fifo)
    with pytest.raises(ClipcapError, match="not a regular file"):
        read_json("/dev/zero")  # never ends
    result = run_cli("train", tmp_path / "f.h5", "--out", tmp_path / "run", "--config", fifo)
    assert "not a regular file" in assert_one_line_error(result)


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_annotations_are_one_line(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    path.write_text('{"image": "a.png", "caption": ' + DEEP + "}\n")
    with pytest.raises(ClipcapError, match="nested too deeply"):
        read_annotations(path, "auto")


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize("sidecar", [DEEP, '{"captions": ' + LONG_NUMBER + "}", "{broken"])
def test_an_unreadable_webdataset_sidecar_fails_that_sample_only(sidecar):
    from clipcap_cache.data.images import ImageLoadError
    from clipcap_cache.data.webdataset import Sample, parse_sample

    sample = Sample("k", "00000.tar", {"png": b"", "json": sidecar.encode()})
    with pytest.raises(ImageLoadError, match="k.json"):
        parse_sample(sample, "train")


@pytest.mark.bad_input("data loss")
@pytest.mark.parametrize("target", ["an input", "another image", "a checkpoint file"])
def test_caption_out_never_replaces_the_users_files(tmp_path, trained_run, shapes, target):
    import shutil

    _, root = shapes
    images = sorted((root / "images").iterdir())[:2]
    folder = tmp_path / "pictures"
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)
    first, second = sorted(folder.iterdir())
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained_run / "checkpoints" / "best", checkpoint)
    out, inputs = {
        "an input": (first, [folder / "*.png"]),
        "another image": (second, [first]),
        "a checkpoint file": (checkpoint / "config.json", [first]),
    }[target]
    before = out.read_bytes()
    result = run_cli(
        "caption", *inputs, "--checkpoint", checkpoint, "--out", out, "--format", "json"
    )
    assert "--out" in assert_one_line_error(result)
    assert out.read_bytes() == before


@pytest.mark.bad_input("message")
@pytest.mark.parametrize("kind", ["fifo", "device", "missing", "folder"])
def test_a_path_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path, kind):
    path = {"device": Path("/dev/zero"), "folder": tmp_path}.get(kind, tmp_path / "x.h5")
    if kind == "fifo":
        os.mkfifo(path)
    expected = {
        "fifo": "is not a regular file (a pipe or a device?)",
        "device": "is not a regular file (a pipe or a device?)",
        "missing": "not found",
        "folder": "is a directory, not a file",
    }[kind]
    assert expected in assert_one_line_error(run_cli("inspect", path))
    references = assert_one_line_error(
        run_cli("score", tmp_path / "none.json", "--references", path, "--no-bertscore")
    )
    assert expected in references
