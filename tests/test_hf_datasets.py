"""Hugging Face datasets input: each layout gives the same cache as the same images as files.

The datasets are built with the `datasets` library itself (save_to_disk, to_parquet, the
imagefolder layout, and the cache a hub download leaves), from the shapes images.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from clipcap_cache.data.annotations import read_annotations
from clipcap_cache.data.cache import read_cache

datasets = pytest.importorskip("datasets")
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` prepares imagefolders in its cache: a fresh one per test, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def extract(source, out, clip_dir, *extra, workers=0):
    return run_cli(
        "extract-features",
        source,
        "--out",
        out,
        "--clip-model",
        clip_dir,
        "--batch-size",
        "3",
        "--num-workers",
        str(workers),
        *extra,
    )


def assert_same_rows(cache_path, reference_path):
    """Equal row for row: embeddings, image ids, splits, captions and which row each belongs to."""
    got, want = read_cache(cache_path), read_cache(reference_path)
    assert got.image_ids == want.image_ids
    np.testing.assert_array_equal(got.splits, want.splits)
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    assert got.captions == want.captions
    np.testing.assert_array_equal(got.caption_image_index, want.caption_image_index)
    return got


@pytest.fixture(scope="module")
def images(tmp_path_factory, shapes, clip_dir):
    """16 shapes images (train, val, test in that order) and two reference caches made from them
    as image files plus JSON lines: with every caption, and with the first caption only."""
    annotations, root = shapes
    records = read_annotations(annotations)
    records = (
        [r for r in records if r.split == "train"][:8]
        + [r for r in records if r.split == "val"][:4]
        + [r for r in records if r.split == "test"][:4]
    )
    tmp_path = tmp_path_factory.mktemp("hf-reference")
    references = {}
    for name, keep in (("all", None), ("first", 1)):
        rows = [
            {"image": r.path, "caption": c, "split": r.split}
            for r in records
            for c in r.captions[:keep]
        ]
        jsonl = tmp_path / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
        references[name] = tmp_path / f"{name}.h5"
        result = extract(jsonl, references[name], clip_dir, "--images", root)
        assert result.returncode == 0, result.stderr
    return records, root, references


def image_struct(record, root):
    return {"bytes": (root / record.path).read_bytes(), "path": record.path}


def features(**columns):
    return datasets.Features(columns)


def test_dataset_dict_saved_to_disk(tmp_path, images, clip_dir):
    records, root, references = images
    splits = {}
    for split, name in SPLIT_NAMES.items():
        chosen = [r for r in records if r.split == split]
        splits[name] = datasets.Dataset.from_dict(
            {
                "image": [image_struct(r, root) for r in chosen],
                "image_id": [r.path for r in chosen],
                "sentences": [r.captions for r in chosen],  # Karpathy's list of captions
            },
            features=features(
                image=datasets.Image(),
                image_id=datasets.Value("string"),
                sentences=datasets.List(datasets.Value("string")),
            ),
        )
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "saved")

    # Parts of 3 rows, read by two workers: the cache still keeps the dataset's order.
    args = ("--shard-size", "3")
    result = extract(tmp_path / "saved", tmp_path / "d.h5", clip_dir, *args, workers=2)
    assert result.returncode == 0, result.stderr
    cache = assert_same_rows(tmp_path / "d.h5", references["all"])
    assert cache.attrs["annotation_format"] == "save_to_disk"
    again = extract(tmp_path / "saved", tmp_path / "d.h5", clip_dir, *args)
    assert "already complete" in again.stdout

    # --split reads only the split it names.
    assert (
        extract(tmp_path / "saved", tmp_path / "v.h5", clip_dir, "--split", "val").returncode == 0
    )
    assert list(read_cache(tmp_path / "v.h5").splits) == ["val"] * 4


def test_one_dataset_with_bytes_and_a_split_column(tmp_path, images, clip_dir):
    records, root, references = images
    dataset = datasets.Dataset.from_dict(
        {
            "png": [(root / r.path).read_bytes() for r in records],  # plain bytes, no Image feature
            "name": [r.path for r in records],
            "text": [r.captions[0] for r in records],
            "which": [{"val": "valid"}.get(r.split, r.split) for r in records],
        }
    )
    dataset.save_to_disk(tmp_path / "one")
    columns = ("--id-column", "name", "--split-column", "which")
    result = extract(tmp_path / "one", tmp_path / "one.h5", clip_dir, *columns)
    assert result.returncode == 0, result.stderr
    assert_same_rows(tmp_path / "one.h5", references["first"])


def test_karpathy_sentences_as_objects_with_raw_text(tmp_path, images, clip_dir):
    records, root, references = images
    datasets.Dataset.from_dict(
        {
            "image": [image_struct(r, root) for r in records],
            "cocoid": [r.path for r in records],
            "split": [r.split for r in records],
            "sentences": [[{"raw": c, "tokens": c.split()} for c in r.captions] for r in records],
        },
    ).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "karpathy")
    result = extract(tmp_path / "karpathy", tmp_path / "k.h5", clip_dir)
    assert result.returncode == 0, result.stderr
    assert_same_rows(tmp_path / "k.h5", references["all"])


def write_parquet(records, root, directory: Path) -> list[Path]:
    """The hub's Parquet layout: split-NNNNN.parquet files with the Image feature's bytes."""
    directory.mkdir(parents=True)
    files = []
    for split, name in SPLIT_NAMES.items():
        chosen = [r for r in records if r.split == split]
        for number, start in enumerate(range(0, len(chosen), 5)):
            part = chosen[start : start + 5]
            dataset = datasets.Dataset.from_dict(
                {
                    "image": [image_struct(r, root) for r in part],
                    "captions": [r.captions for r in part],
                },
                features=features(
                    image=datasets.Image(), captions=datasets.List(datasets.Value("string"))
                ),
            )
            files.append(directory / f"{name}-{number:05d}.parquet")
            dataset.to_parquet(files[-1])
    return files


def test_parquet_files_by_brace_pattern_glob_and_directory(tmp_path, images, clip_dir):
    records, root, references = images
    files = write_parquet(records, root, tmp_path / "data")
    assert len(files) == 4  # two train files, one validation, one test
    pattern = str(tmp_path / "data" / "{train-0000{0,1},validation-00000,test-00000}.parquet")
    result = extract(pattern, tmp_path / "p.h5", clip_dir, workers=2)
    assert result.returncode == 0, result.stderr
    cache = assert_same_rows(tmp_path / "p.h5", references["all"])  # ids: the images' own paths
    assert cache.attrs["annotation_format"] == "parquet"
    # A glob and the directory name the same files: the finished cache is recognised.
    glob = extract(str(tmp_path / "data" / "*.parquet"), tmp_path / "p.h5", clip_dir)
    assert "already complete" in glob.stdout, glob.stderr
    assert "already complete" in extract(tmp_path / "data", tmp_path / "p.h5", clip_dir).stdout


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_imagefolder_with_metadata(tmp_path, images, clip_dir, metadata):
    records, root, references = images
    folder = tmp_path / "folder"
    for r in records:
        (folder / r.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / r.path, folder / r.path)
    rows = [{"file_name": r.path, "caption": r.captions[0], "split": r.split} for r in records]
    if metadata.endswith(".jsonl"):
        (folder / metadata).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with open(folder / metadata, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    result = extract(folder, tmp_path / "f.h5", clip_dir)
    assert result.returncode == 0, result.stderr
    cache = assert_same_rows(tmp_path / "f.h5", references["first"])
    assert cache.image_paths == [r.path for r in records]  # relative to the folder
    assert cache.attrs["annotation_format"] == "imagefolder"


def lay_out_hub_download(parquet_files, cache_dir: Path, repo: str, revision: str) -> None:
    """What `load_dataset(repo)` leaves in the datasets cache after downloading a Parquet repo:
    `user___name/default/0.0.0/REVISION/name-SPLIT.arrow` with its dataset_info.json, which
    `datasets` reads back offline."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    user, name = repo.split("/")
    data_files = {}
    for path in parquet_files:
        data_files.setdefault(path.name.split("-")[0], []).append(str(path))
    builder = Parquet(
        cache_dir=str(cache_dir / "build"), dataset_name=name, hash=revision, data_files=data_files
    )
    builder.download_and_prepare()
    target = cache_dir / f"{user}___{name}" / "default" / "0.0.0" / revision
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(cache_dir / "build")


def test_hub_id_loads_offline_from_the_datasets_cache(tmp_path, images, clip_dir, datasets_cache):
    records, root, references = images
    assert datasets.config.HF_HUB_OFFLINE  # conftest switches the hub off
    files = write_parquet(records, root, tmp_path / "repo")
    lay_out_hub_download(files, datasets_cache, "someone/shapes", "0123abcd" * 5)
    result = extract("someone/shapes", tmp_path / "hub.h5", clip_dir)
    assert result.returncode == 0, result.stderr
    cache = assert_same_rows(tmp_path / "hub.h5", references["all"])
    assert cache.attrs["annotation_format"] == "hub"
    assert "someone/shapes@" + "0123abcd" * 5 in cache.attrs["source"]


def test_crashed_run_resumes_to_the_same_cache(tmp_path, images, clip_dir, monkeypatch):
    from clipcap_cache.extraction import features as extraction

    records, root, references = images
    files = write_parquet(records, root, tmp_path / "data")
    out = tmp_path / "r.h5"
    written = []
    write_shard = extraction._write_shard

    def crash_after_two(path, *args):
        if len(written) == 2:
            raise RuntimeError("the machine went down")
        write_shard(path, *args)
        written.append(path)

    monkeypatch.setattr(extraction, "_write_shard", crash_after_two)
    config = extraction.FeatureConfig(
        annotations=str(files[0].parent),
        images=None,
        out=str(out),
        clip_model=str(clip_dir),
        batch_size=3,  # the reference's batches: the same rows are encoded together
        num_workers=0,
    )
    with pytest.raises(RuntimeError, match="went down"):
        extraction.extract_features(config)
    assert not out.exists() and len(list(Path(f"{out}.parts").glob("shard-*"))) == 2
    monkeypatch.setattr(extraction, "_write_shard", write_shard)

    result = extract(files[0].parent, out, clip_dir)
    assert "resumed after 8" in result.stdout, result.stdout + result.stderr  # the train files
    assert_same_rows(out, references["all"])


def test_undecodable_bytes_are_recorded_failures(tmp_path, images, clip_dir):
    records, root, _ = images
    good = [image_struct(r, root) for r in records[:3]]
    rows = [good[0], {"bytes": b"not an image at all", "path": "broken.png"}, good[1], None]
    dataset = datasets.Dataset.from_dict(
        {"image": rows, "caption": ["one", "two", "three", "four"]},
        features=features(image=datasets.Image(), caption=datasets.Value("string")),
    )
    dataset.save_to_disk(tmp_path / "bad")
    result = extract(tmp_path / "bad", tmp_path / "bad.h5", clip_dir)
    assert result.returncode == 0, result.stderr
    cache = read_cache(tmp_path / "bad.h5")
    assert cache.captions == ["one", "three"]
    assert dict(zip(cache.failed_paths, cache.failed_reasons, strict=True)) == {
        "broken.png": "not an image",
        "rows/3": "no image in the row",
    }
    strict = extract(tmp_path / "bad", tmp_path / "strict.h5", clip_dir, "--strict")
    assert "broken.png: not an image" in assert_one_line_error(strict)
    assert not (tmp_path / "strict.h5").exists()


@pytest.mark.bad_input("parsing")
def test_image_paths_are_read_under_the_image_root_only(tmp_path, images, clip_dir):
    records, root, _ = images
    paths = [records[0].path, "../outside.png", "/etc/hostname", records[1].path]
    datasets.Dataset.from_dict({"image": paths, "caption": ["a", "b", "c", "d"]}).save_to_disk(
        tmp_path / "paths"
    )
    result = extract(tmp_path / "paths", tmp_path / "p.h5", clip_dir, "--images", root)
    assert result.returncode == 0, result.stderr
    cache = read_cache(tmp_path / "p.h5")
    assert cache.image_ids == [records[0].path, records[1].path]
    assert [r.split(" is outside")[0] for r in cache.failed_reasons] == paths[1:3]


@pytest.mark.bad_input("data loss")
def test_parquet_damaged_inside_keeps_the_other_files_and_records_a_failure(
    tmp_path, images, clip_dir
):
    import pyarrow.parquet as pq

    records, root, _ = images
    paths = []
    for number, chosen in enumerate((records[:4], records[4:10])):
        dataset = datasets.Dataset.from_dict(
            {
                "image": [image_struct(r, root) for r in chosen],
                "caption": [r.captions[0] for r in chosen],
            },
            features=features(image=datasets.Image(), caption=datasets.Value("string")),
        )
        paths.append(tmp_path / "data" / f"train-{number:05d}.parquet")
        dataset.to_parquet(paths[-1], batch_size=2)  # row groups of two rows
    # The second file's last row group is overwritten; its footer is intact.
    column = pq.ParquetFile(paths[1]).metadata.row_group(2).column(0)
    start, stop = (
        column.data_page_offset + 8,
        column.data_page_offset + column.total_compressed_size,
    )
    data = bytearray(paths[1].read_bytes())
    data[start:stop] = b"\xab" * (stop - start)
    paths[1].write_bytes(bytes(data))

    result = extract(tmp_path / "data", tmp_path / "d.h5", clip_dir)
    assert result.returncode == 0, result.stderr
    cache = read_cache(tmp_path / "d.h5")
    kept = len(cache.image_ids)
    # The first file whole, and of the second the rows the reader gave before the damage.
    assert 4 <= kept < 10 and cache.image_ids == [r.path for r in records[:kept]]
    assert cache.failed_paths == [f"train-00001.parquet/{kept - 4}"]
    assert cache.failed_reasons[0].startswith("unreadable data (")


@pytest.fixture
def small_saved(tmp_path, images):
    records, root, _ = images
    dataset = datasets.Dataset.from_dict(
        {
            "picture": [image_struct(r, root) for r in records[:2]],
            "label": [1, 2],
            "words": [r.captions[0] for r in records[:2]],
        },
        features=features(
            picture=datasets.Image(), label=datasets.Value("int64"), words=datasets.Value("string")
        ),
    )
    dataset.save_to_disk(tmp_path / "small")
    return tmp_path / "small"


@pytest.mark.bad_input("message")
@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "has no caption column (one named caption/"),
        (["--caption-column", "label"], "column 'label' holds Value('int64')"),
        (["--caption-column", "words", "--image-column", "photo"], "no column 'photo'"),
        (["--caption-column", "words", "--split-column", "part"], "no column 'part'"),
        (["--caption-column", "words", "--id-column", "key"], "no column 'key' (--id-column)"),
    ],
)
def test_missing_or_wrong_columns_list_the_columns_there_are(
    tmp_path, small_saved, clip_dir, extra, message
):
    error = assert_one_line_error(extract(small_saved, tmp_path / "x.h5", clip_dir, *extra))
    assert message in error and "columns are: picture, label, words" in error
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.bad_input("parsing")
def test_corrupt_parquet_is_one_line_and_nothing_is_written(tmp_path, images, clip_dir):
    records, root, _ = images
    files = write_parquet(records, root, tmp_path / "data")
    files[1].write_bytes(files[1].read_bytes()[:-40])  # the footer is cut off
    out = tmp_path / "p.h5"
    error = assert_one_line_error(extract(tmp_path / "data", out, clip_dir))
    assert "not a readable Parquet file" in error and files[1].name in error
    assert not out.exists() and not Path(f"{out}.parts").exists()


@pytest.mark.bad_input("parsing")
@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_empty_dataset_is_one_line(tmp_path, clip_dir, layout):
    empty = datasets.Dataset.from_dict(
        {"image": [], "caption": []},
        features=features(image=datasets.Image(), caption=datasets.Value("string")),
    )
    if layout == "parquet":
        source = tmp_path / "train-00000.parquet"
        empty.to_parquet(source)
    else:
        source = tmp_path / "empty"
        empty.save_to_disk(source)
    error = assert_one_line_error(extract(source, tmp_path / "e.h5", clip_dir))
    assert "no rows" in error
    assert not (tmp_path / "e.h5").exists()


@pytest.mark.bad_input("message")
def test_hub_id_offline_and_not_cached_is_one_line(tmp_path, clip_dir):
    error = assert_one_line_error(extract("someone/not-downloaded", tmp_path / "h.h5", clip_dir))
    assert "cannot load the hub dataset 'someone/not-downloaded'" in error
    assert "offline" in error


@pytest.mark.bad_input("bad option")
def test_limit_is_refused_for_datasets(tmp_path, small_saved, clip_dir):
    result = extract(small_saved, tmp_path / "l.h5", clip_dir, "--limit", "1")
    assert "--limit does not apply to Hugging Face datasets" in assert_one_line_error(result)


@pytest.mark.slow
def test_two_processes_divide_the_parts_and_write_the_same_cache(
    tmp_path, images, clip_dir, monkeypatch, datasets_cache
):
    from test_distributed import assert_same_cache, torchrun

    records, root, _ = images
    files = write_parquet(records, root, tmp_path / "data")
    assert extract(files[0].parent, tmp_path / "one.h5", clip_dir).returncode == 0
    args = ["extract-features", files[0].parent, "--out", tmp_path / "two.h5"]
    monkeypatch.setenv("HF_DATASETS_CACHE", str(datasets_cache))
    result = torchrun(*args, "--clip-model", clip_dir, "--batch-size", "3", "--num-workers", "0")
    assert result.stdout.count("wrote ") == 1
    assert_same_cache(tmp_path / "one.h5", tmp_path / "two.h5")


def _parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.bad_input("silent wrong result")
def test_two_rows_of_one_image_id_are_refused_naming_both(tmp_path, images, clip_dir):
    records, root, _ = images
    png = [(root / r.path).read_bytes() for r in records[:3]]
    # Without an id column the ids are the paths: one image listed twice, one row per caption.
    source = _parquet(
        tmp_path / "rows.parquet",
        image=[{"bytes": png[0], "path": "a.png"}, {"bytes": png[1], "path": "b.png"},
               {"bytes": png[0], "path": "a.png"}],
        caption=["a red circle", "a blue square", "a circle in red"],
    )  # fmt: skip
    line = assert_one_line_error(extract(source, tmp_path / "d.h5", clip_dir))
    assert "the image id 'a.png' is that of a.png and again of a.png" in line
    assert "--id-column" in line
    assert not (tmp_path / "d.h5").exists()
    # Ids of their own that repeat: the same.
    source = _parquet(
        tmp_path / "ids.parquet", image=png, caption=["x", "y", "z"], image_id=[7, 8, 7]
    )
    line = assert_one_line_error(extract(source, tmp_path / "i.h5", clip_dir))
    assert "the image id '7' is that of ids.parquet/0 and again of ids.parquet/2" in line


@pytest.mark.bad_input("silent wrong result")
@pytest.mark.parametrize("ids", [[1.0, 2.0], [b"1", b"2"], [True, False]])
def test_an_id_column_of_floats_bytes_or_booleans_is_refused(tmp_path, images, clip_dir, ids):
    records, root, _ = images
    png = [(root / r.path).read_bytes() for r in records[:2]]
    source = _parquet(tmp_path / "rows.parquet", image=png, caption=["x", "y"], image_id=ids)
    line = assert_one_line_error(extract(source, tmp_path / "d.h5", clip_dir))
    assert "column 'image_id' holds" in line and "not text or integers" in line
    assert not (tmp_path / "d.h5").exists()


@pytest.mark.bad_input("parsing")
def test_a_caption_column_of_nested_lists_is_refused_at_once(tmp_path, images, clip_dir):
    records, root, _ = images
    png = [(root / r.path).read_bytes() for r in records[:2]]
    source = _parquet(tmp_path / "rows.parquet", image=png, caption=[[["a"], ["b"]], [["c"]]])
    line = assert_one_line_error(extract(source, tmp_path / "d.h5", clip_dir))
    assert "column 'caption' holds" in line and "not text or a list of texts" in line


@pytest.mark.bad_input("traceback")
def test_nul_characters_in_rows_are_recorded_failures(tmp_path, images, clip_dir):
    records, root, _ = images
    png = [(root / r.path).read_bytes() for r in records[:4]]
    source = _parquet(
        tmp_path / "rows.parquet",
        image=[{"bytes": png[0], "path": "a\x00.png"}, {"bytes": png[1], "path": "b.png"},
               {"bytes": png[2], "path": "c.png"}, {"bytes": png[3], "path": "d.png"}],
        caption=[["one"], ["two\x00"], ["three", None], ["four"]],
        image_id=["1", "2", "3", "4\x00"],
    )  # fmt: skip
    result = extract(source, tmp_path / "d.h5", clip_dir)
    assert result.returncode == 0, result.stderr
    cache = read_cache(tmp_path / "d.h5")
    assert cache.image_ids == ["3"] and cache.captions == ["three"]  # a null caption is none
    assert dict(zip(cache.failed_paths, cache.failed_reasons, strict=True)) == {
        "rows.parquet/0": "the image path in column 'image' holds a NUL character",
        "rows.parquet/1": "column 'caption' holds a caption with a NUL character",
        "rows.parquet/3": "the image id in column 'image_id' holds a NUL character",
    }
