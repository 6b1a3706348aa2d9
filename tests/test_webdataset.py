"""WebDataset input: tar shards give the same cache as the same images as files plus JSON lines."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from clipcap_cache.data.annotations import read_annotations
from clipcap_cache.data.cache import read_cache


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(records, root: Path, directory: Path, per_shard: int):
    """img2dataset's layout: KEY.png with a KEY.json sidecar (captions and split), or a KEY.txt.

    Returns the tars and the keys of the samples with a .txt, which name no split.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shards, plain = [], []
    for number, start in enumerate(range(0, len(records), per_shard)):
        shards.append(directory / f"{number:05d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for i, record in enumerate(records[start : start + per_shard]):
                key = Path(record.path).stem
                add_member(tar, f"{key}.png", (root / record.path).read_bytes())
                if i % 3 == 2 and record.split == "train":  # a plain caption, default split
                    record.captions = record.captions[:1]
                    plain.append(key)
                    add_member(tar, f"{key}.txt", record.captions[0].encode())
                else:
                    sidecar = {"captions": record.captions, "split": record.split, "url": "x"}
                    add_member(tar, f"{key}.json", json.dumps(sidecar).encode())
    return shards, plain


def extract(source, out, clip_dir, *extra, workers=0):
    return run_cli(
        "extract-features",
        source,
        "--out",
        out,
        "--clip-model",
        clip_dir,
        "--batch-size",
        "4",
        "--num-workers",
        str(workers),
        *extra,
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shapes):
    """20 shapes images in 3 tars, and the same images as files plus a JSON lines file."""
    tmp_path = tmp_path_factory.mktemp("webdataset")
    annotations, root = shapes
    records = read_annotations(annotations)
    records = records[:14] + [r for r in records if r.split == "val"][:6]
    tars, plain = write_shards(records, root, tmp_path / "shards", per_shard=8)
    rows = [{"image": r.path, "caption": c, "split": r.split} for r in records for c in r.captions]
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tars, jsonl, root, plain


def test_webdataset_gives_the_same_cache_as_files_and_jsonl(tmp_path, shards, clip_dir):
    tars, jsonl, root, _ = shards
    pattern = str(tars[0].parent / "{00000..00002}.tar")
    # Two workers read alternate tars; the cache keeps the tars' order.
    result = extract(pattern, tmp_path / "wds.h5", clip_dir, workers=2)
    assert result.returncode == 0, result.stderr
    assert extract(jsonl, tmp_path / "files.h5", clip_dir, "--images", root).returncode == 0
    wds, files = read_cache(tmp_path / "wds.h5"), read_cache(tmp_path / "files.h5")

    assert wds.image_ids == [Path(i).stem for i in files.image_ids]
    np.testing.assert_array_equal(wds.embeddings, files.embeddings)
    assert wds.captions == files.captions
    np.testing.assert_array_equal(wds.caption_image_index, files.caption_image_index)
    np.testing.assert_array_equal(wds.splits, files.splits)
    assert wds.image_paths[9] == "00001.tar/000009.png"
    assert wds.attrs["annotation_format"] == "webdataset"
    # A directory of tars is the same input as the pattern: the finished cache is recognised.
    again = extract(tars[0].parent, tmp_path / "wds.h5", clip_dir)
    assert "already complete" in again.stdout


def test_webdataset_split_and_split_default(tmp_path, shards, clip_dir):
    tars, _, _, plain = shards
    source = tars[0].parent
    assert extract(source, tmp_path / "val.h5", clip_dir, "--split", "val").returncode == 0
    assert list(read_cache(tmp_path / "val.h5").splits) == ["val"] * 6
    # The .txt samples name no split: --split-default puts them in test.
    result = extract(source, tmp_path / "t.h5", clip_dir, "--split-default", "test")
    assert result.returncode == 0, result.stderr
    cache = read_cache(tmp_path / "t.h5")
    splits = dict(zip(cache.image_ids, cache.splits, strict=True))
    assert plain and all(splits[key] == "test" for key in plain)
    assert sum(s == "train" for s in splits.values()) == 14 - len(plain)


def test_bad_tar_members_are_failures_and_uncaptioned_samples_are_counted(
    tmp_path, shapes, clip_dir
):
    annotations, root = shapes
    good = (root / read_annotations(annotations)[0].path).read_bytes()
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "a.png", good)
        add_member(tar, "a.txt", b"a good one")
        add_member(tar, "b.jpg", b"not a jpeg at all")  # corrupt member
        add_member(tar, "b.txt", b"a corrupt image")
        add_member(tar, "c.png", good)  # no caption
        add_member(tar, "d.png", good)
        add_member(tar, "d.json", b"{not json")  # unreadable sidecar
        add_member(tar, "e.txt", b"a caption with no image")
        add_member(tar, "f.png", good)
        add_member(tar, "f.txt", b"the last complete sample")
        add_member(tar, "g.png", good)
        add_member(tar, "g.txt", b"cut off")
    data = shard.read_bytes()
    cut = data.index(b"cut off") + 3  # the last member ends early: a truncated tar
    shard.write_bytes(data[:cut])

    result = extract(shard, tmp_path / "bad.h5", clip_dir)
    assert result.returncode == 0, result.stderr
    assert "1 without captions left out" in result.stdout
    cache = read_cache(tmp_path / "bad.h5")
    assert cache.image_ids == ["a", "f"]
    reasons = dict(zip(cache.failed_paths, cache.failed_reasons, strict=True))
    assert sorted(reasons) == [
        "00000.tar/b.jpg",
        "00000.tar/d.png",
        "00000.tar/e",
        "00000.tar/g.png",
    ]
    assert reasons["00000.tar/b.jpg"] == "not an image"
    assert reasons["00000.tar/e"] == "no image in the sample"
    assert reasons["00000.tar/g.png"].startswith("truncated or corrupt tar")

    strict = extract(shard, tmp_path / "strict.h5", clip_dir, "--strict")
    assert "00000.tar/b.jpg: not an image" in assert_one_line_error(strict)


@pytest.mark.bad_input("parsing")
@pytest.mark.parametrize(
    "source, extra, message",
    [
        ("{00010..00019}.tar", [], "matches no tar shard"),
        ("{00000..00003}.tar", [], "1 of 4 shards"),
        ("{00000..00002", ["--format", "webdataset"], "unbalanced braces"),
        ("{00000..00002}.tar", ["--images", "."], "--images is not used"),
        ("{00000..00002}.tar", ["--limit", "3"], "--limit does not apply"),
        ("{00000..00002}.tar", ["--split-default", "dev"], "--split-default must be one of"),
    ],
)
def test_bad_webdataset_input_is_one_line(tmp_path, shards, clip_dir, source, extra, message):
    tars, _, _, plain = shards
    out = tmp_path / "x.h5"
    result = extract(str(tars[0].parent / source), out, clip_dir, *extra)
    assert message in assert_one_line_error(result)
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_divide_the_tars_and_write_the_same_cache(tmp_path, shards, clip_dir):
    from test_distributed import assert_same_cache, torchrun

    tars, _, _, _ = shards
    assert extract(tars[0].parent, tmp_path / "one.h5", clip_dir).returncode == 0
    args = ["extract-features", tars[0].parent, "--out", tmp_path / "two.h5"]
    result = torchrun(*args, "--clip-model", clip_dir, "--batch-size", "4", "--num-workers", "0")
    assert result.stdout.count("wrote ") == 1
    assert_same_cache(tmp_path / "one.h5", tmp_path / "two.h5")


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize(
    "pattern, message",
    [
        ("{0..99999999}.tar", "stands for 100,000,000 names, more than 1,000,000"),
        ("00000.tar" + "{,,,,,,,,,}" * 8, "stands for 100,000,000 names"),  # repeats: a hang
        ("{00000..00002.tar", "unbalanced braces"),  # without --format: not '--images is required'
        ("{00000,00000}.tar", "names the shard"),  # one tar twice: every sample doubled
        ("{" * 5000 + "}" * 5000 + ".tar", "nests its braces 5000 deep, more than 20"),
    ],
)
def test_brace_patterns_are_bounded_before_they_expand(
    tmp_path, shards, clip_dir, pattern, message
):
    import time

    tars, _, _, _ = shards
    started = time.monotonic()
    result = extract(str(tars[0].parent / pattern), tmp_path / "x.h5", clip_dir)
    assert message in assert_one_line_error(result)
    assert time.monotonic() - started < 10  # refused at once, not after expanding
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.bad_input("traceback")
def test_a_sparse_member_of_terabytes_is_a_failure_not_read(tmp_path, shapes, clip_dir):
    annotations, root = shapes
    good = (root / read_annotations(annotations)[0].path).read_bytes()
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "a.png", good)
        add_member(tar, "a.txt", b"kept")
        add_member(tar, "b.png", good)
        # A header that claims 2 TB for a member whose data is not there: what a sparse member
        # looks like to a reader that trusts its size. Reading it would fill the memory.
        info = tarfile.TarInfo("b.txt")
        info.size = 2 * 2**40
        tar.addfile(info)
    result = extract(shard, tmp_path / "sparse.h5", clip_dir)
    cache = read_cache(tmp_path / "sparse.h5")
    assert result.returncode == 0 and cache.image_ids == ["a"], result.stderr
    assert cache.failed_paths == ["00000.tar/b.png"]
    assert cache.failed_reasons[0].startswith("member too large (b.txt: 2,199,023,255,552 bytes")


@pytest.mark.bad_input("silent wrong result")
@pytest.mark.parametrize("layout", ["one tar", "two tars", "same-named tars in two folders"])
def test_a_key_in_two_samples_is_refused_naming_both(tmp_path, shapes, clip_dir, layout):
    annotations, root = shapes
    pngs = [(root / r.path).read_bytes() for r in read_annotations(annotations)[:2]]
    members = {
        "one tar": {"a/00000.tar": [("k1", 0), ("k2", 1), ("k1", 1)]},
        "two tars": {"a/00000.tar": [("k1", 0)], "a/00001.tar": [("k2", 0), ("k1", 1)]},
        "same-named tars in two folders": {"d1/s.tar": [("k1", 0)], "d2/s.tar": [("k1", 1)]},
    }[layout]
    for name, samples in members.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        with tarfile.open(tmp_path / name, "w") as tar:
            for key, image in samples:
                add_member(tar, f"{key}.png", pngs[image])
                add_member(tar, f"{key}.txt", f"caption of image {image}".encode())
    source = (
        tmp_path / "a" if layout != "same-named tars in two folders" else tmp_path / "{d1,d2}/s.tar"
    )
    result = extract(source, tmp_path / "dup.h5", clip_dir)
    message = assert_one_line_error(result)
    first, second = list(members) if len(members) == 2 else [*members] * 2
    assert f"the key 'k1' is in {tmp_path / first}" in message
    assert f"again in {tmp_path / second}" in message
    assert not (tmp_path / "dup.h5").exists()


def test_captions_beyond_a_safetensors_header_are_kept(tmp_path, shapes, clip_dir):
    # Seven samples of 15 MB captions: 105 MB of records, over safetensors' 100 MB header limit,
    # which held a progress shard's records and failed every rerun alike.
    annotations, root = shapes
    good = (root / read_annotations(annotations)[0].path).read_bytes()
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(7):
            add_member(tar, f"{i}.png", good)
            add_member(tar, f"{i}.txt", (f"caption {i} " * 1_400_000).encode())
    result = extract(shard, tmp_path / "long.h5", clip_dir)
    assert result.returncode == 0, result.stderr
    cache = read_cache(tmp_path / "long.h5")
    assert cache.image_ids == [str(i) for i in range(7)]
    assert [len(c) for c in cache.captions] == [
        len(f"caption {i} " * 1_400_000) - 1 for i in range(7)
    ]
