import io
import json
import signal
import subprocess
import sys
import tarfile
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_line_error, run_cli
from PIL import Image
from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

from clipcap_cache.data.cache import read_cache


@pytest.fixture
def mixed_dataset(tmp_path):
    """Six images in JSON lines, two captions each, plus four bad files."""
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(6):
        name = f"img{i}.jpg" if i % 2 else f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (48 + i, 40, 3), dtype=np.uint8)).save(root / name)
        rows += [
            {"image": name, "caption": f"caption {i} a", "split": "train" if i < 4 else "val"},
            {"image": name, "caption": f"caption {i} b", "split": "train" if i < 4 else "val"},
        ]
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("hello")
    (root / "cut.jpg").write_bytes((root / "img1.jpg").read_bytes()[:200])
    for bad in ("empty.jpg", "text.jpg", "cut.jpg", "missing.jpg"):
        rows.append({"image": bad, "caption": "never seen", "split": "train"})
    annotations = tmp_path / "data.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return annotations, root


def extract_args(annotations, root, out, clip_dir, *extra, batch_size=4):
    """The `clipcap extract-features` arguments of these tests, one process's worth of work."""
    return [
        "extract-features",
        annotations,
        "--images",
        root,
        "--out",
        out,
        "--clip-model",
        clip_dir,
        "--batch-size",
        str(batch_size),
        "--num-workers",
        "0",
        *extra,
    ]


def extract(annotations, root, out, clip_dir, *extra, check=None):
    return run_cli(*extract_args(annotations, root, out, clip_dir, *extra), check=check)


def test_extract_writes_one_row_per_image_and_records_bad_images(tmp_path, mixed_dataset, clip_dir):
    annotations, root = mixed_dataset
    out = tmp_path / "f.h5"
    result = extract(annotations, root, out, clip_dir, "--num-workers", "2", check=0)
    assert "6 images, 4 skipped" in result.stdout
    cache = read_cache(out)
    assert cache.embeddings.shape == (6, 64) and cache.embeddings.dtype == np.float16
    assert cache.image_paths == [f"img{i}.{'jpg' if i % 2 else 'png'}" for i in range(6)]
    assert cache.splits.tolist() == ["train"] * 4 + ["val"] * 2
    assert cache.caption_image_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert cache.captions[2:4] == ["caption 1 a", "caption 1 b"]
    reasons = dict(zip(cache.failed_paths, cache.failed_reasons, strict=True))
    assert set(reasons) == {"empty.jpg", "text.jpg", "cut.jpg", "missing.jpg"}
    assert reasons["missing.jpg"] == "missing file" and reasons["empty.jpg"] == "empty file"
    assert reasons["cut.jpg"].startswith("truncated")
    attrs = cache.attrs
    assert attrs["complete"] and attrs["format_version"] == 1 and attrs["embedding_dim"] == 64
    assert attrs["clip_model"] == str(clip_dir.resolve()) and attrs["image_size"] == 32
    assert attrs["source"].startswith("data.jsonl:") and attrs["package_version"]
    assert not (tmp_path / "f.h5.parts").exists()

    inspect = run_cli("inspect", out, "--json", check=0)
    info = json.loads(inspect.stdout)
    assert info["complete"] and info["images"] == 6 and info["failed"] == 4
    assert info["splits"] == {
        "train": {"images": 4, "captions": 8},
        "val": {"images": 2, "captions": 4},
    }
    assert "clip model" in run_cli("inspect", out, check=0).stdout


def test_pil_image_processor_agrees_with_torchvision_and_is_not_mixed(
    tmp_path, mixed_dataset, clip_dir
):
    annotations, root = mixed_dataset
    fast, pil = tmp_path / "fast.h5", tmp_path / "pil.h5"
    extract(annotations, root, fast, clip_dir, "--dtype", "float32", check=0)
    extract(annotations, root, pil, clip_dir, "--dtype", "float32", "--image-processor", "pil")
    a, b = read_cache(fast), read_cache(pil)
    assert (a.attrs["image_processor"], b.attrs["image_processor"]) == ("torchvision", "pil")
    cosine = torch.nn.functional.cosine_similarity(
        torch.from_numpy(a.embeddings), torch.from_numpy(b.embeddings)
    )
    assert cosine.min() >= 0.999
    assert not np.array_equal(a.embeddings, b.embeddings)  # two real backends ran
    again = extract(
        annotations, root, fast, clip_dir, "--dtype", "float32", "--image-processor", "pil"
    )
    assert "image_processor='torchvision', not 'pil'" in assert_one_line_error(again)


def test_cached_rows_equal_the_hugging_face_reference(tmp_path, clip_dir):
    root = tmp_path / "images"
    root.mkdir()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 8
    image.save(root / "rotated.jpg", exif=exif)
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (33, 61), dtype=np.uint8)).save(
        root / "gray.png"
    )
    annotations = tmp_path / "a.csv"
    annotations.write_text("image,caption\nrotated.jpg,x\ngray.png,y\n")
    out = tmp_path / "f.h5"
    extract(annotations, root, out, clip_dir, "--dtype", "float32", check=0)
    cache = read_cache(out)

    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    processor = AutoImageProcessor.from_pretrained(clip_dir, backend="torchvision")
    for row, name in enumerate(["rotated.jpg", "gray.png"]):
        from PIL import ImageOps

        img = ImageOps.exif_transpose(Image.open(root / name)).convert("RGB")
        with torch.no_grad():
            reference = model(**processor(images=img, return_tensors="pt")).image_embeds[0].numpy()
        np.testing.assert_allclose(cache.embeddings[row], reference, rtol=1e-3, atol=1e-3)
        assert not np.allclose(cache.embeddings[row], cache.embeddings[1 - row], atol=1e-2)


@pytest.mark.bad_input("parsing")
def test_strict_stops_and_all_bad_fails(tmp_path, mixed_dataset, clip_dir):
    annotations, root = mixed_dataset
    error = assert_one_line_error(
        extract(annotations, root, tmp_path / "s.h5", clip_dir, "--strict")
    )
    assert "--strict" in error
    assert not (tmp_path / "s.h5").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\nempty.jpg,a\ntext.jpg,b\n")
    error = assert_one_line_error(extract(bad, root, tmp_path / "b.h5", clip_dir))
    assert "no image could be read" in error


@pytest.mark.bad_input("data loss")
def test_rerun_is_a_no_op_and_other_inputs_are_refused(tmp_path, mixed_dataset, clip_dir):
    annotations, root = mixed_dataset
    out = tmp_path / "f.h5"
    extract(annotations, root, out, clip_dir, check=0)
    before = out.stat().st_mtime_ns
    assert "nothing to do" in extract(annotations, root, out, clip_dir, check=0).stdout
    assert out.stat().st_mtime_ns == before

    other = tmp_path / "other.jsonl"
    other.write_text(annotations.read_text().replace("caption 0 a", "changed"))
    error = assert_one_line_error(extract(other, root, out, clip_dir))
    assert "--overwrite" in error and out.stat().st_mtime_ns == before
    extract(other, root, out, clip_dir, "--overwrite", check=0)
    assert read_cache(out).captions[0] == "changed"


def a_tar_of(root, directory):
    """A WebDataset tar of the dataset's two first good images, each with a caption."""
    directory.mkdir()
    tar_path = directory / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ("img0.png", "img1.jpg"):
            for member, data in ((name, (root / name).read_bytes()), (f"{name[:4]}.txt", b"a")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return tar_path


@pytest.mark.bad_input("data loss")
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
    "target, expected",
    [
        ("annotations", "is one of the inputs"),
        ("tar", "is one of the inputs"),
        ("image", "is an image"),
        ("notes", "not a clipcap feature cache"),
        ("other-hdf5", "not a clipcap feature cache"),
    ],
)
def test_out_never_replaces_an_input_or_a_file_that_is_not_a_cache(
    tmp_path, mixed_dataset, clip_dir, target, expected, overwrite
):
    annotations, root = mixed_dataset
    source, images = annotations, root
    if target == "annotations":
        out = annotations
    elif target == "tar":
        out = source = a_tar_of(root, tmp_path / "tars")
        source, images = out.parent, None
    elif target == "image":
        out = root / "img0.png"
    elif target == "notes":
        out = tmp_path / "notes.json"
        out.write_text('{"mine": true}')
    else:
        out = tmp_path / "theirs.h5"
        with h5py.File(out, "w") as f:
            f["data"] = np.arange(3)
    before = out.read_bytes()
    args = ["extract-features", source, "--out", out, "--clip-model", clip_dir]
    args += ["--num-workers", "0", *(["--images", images] if images else [])]
    error = assert_one_line_error(run_cli(*args, *(["--overwrite"] if overwrite else [])))
    if overwrite or target in ("annotations", "tar", "image"):
        assert expected in error
    assert out.read_bytes() == before


@pytest.mark.bad_input("silent wrong result")
def test_a_wrong_image_root_leaves_nothing_that_poisons_the_corrected_run(
    tmp_path, mixed_dataset, clip_dir, monkeypatch
):
    from clipcap_cache.extraction import features

    annotations, root = mixed_dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    # Every image "missing": nothing is written, and no progress is kept either.
    out = tmp_path / "f.h5"
    assert "no image could be read" in assert_one_line_error(
        extract(annotations, empty, out, clip_dir)
    )
    assert not out.with_name("f.h5.parts").exists()
    extract(annotations, root, out, clip_dir, check=0)
    assert len(read_cache(out).image_ids) == 6

    # Progress made under a half-empty root, then a crash before the gather: the right root is
    # another input, refused without --overwrite, and --overwrite does not reuse the progress.
    half = tmp_path / "half"
    half.mkdir()
    for name in ("img3.jpg", "img4.png", "img5.jpg"):
        (half / name).write_bytes((root / name).read_bytes())
    crashed = tmp_path / "crashed.h5"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "_gather", crash)
    config = features.FeatureConfig(
        annotations=str(annotations),
        images=str(half),
        out=str(crashed),
        clip_model=str(clip_dir),
        num_workers=0,
        shard_size=3,
        device="cpu",
    )
    with pytest.raises(KeyboardInterrupt):
        features.extract_features(config)
    monkeypatch.undo()
    assert (tmp_path / "crashed.h5.parts" / "manifest.json").exists()
    error = assert_one_line_error(extract(annotations, root, crashed, clip_dir))
    assert "image_root" in error and "--overwrite" in error
    extract(annotations, root, crashed, clip_dir, "--overwrite", check=0)
    assert len(read_cache(crashed).image_ids) == 6

    # A finished cache records its root too: another root is another input.
    error = assert_one_line_error(extract(annotations, half, crashed, clip_dir))
    assert "image_root" in error


@pytest.mark.bad_input("traceback")
def test_bad_paths_and_annotations_get_one_line_errors(tmp_path, mixed_dataset, clip_dir):
    annotations, root = mixed_dataset
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')
    assert "not valid JSON" in assert_one_line_error(
        extract(broken, root, tmp_path / "x.h5", clip_dir)
    )
    assert "image root" in assert_one_line_error(
        extract(annotations, tmp_path / "nope", tmp_path / "x.h5", clip_dir)
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert "cannot write" in assert_one_line_error(
        extract(annotations, root, blocker / "x.h5", clip_dir)
    )


@pytest.mark.bad_input("message")
def test_unresolvable_model_name_explains_how_to_pass_a_directory(tmp_path, mixed_dataset):
    annotations, root = mixed_dataset
    result = run_cli(
        "extract-features",
        annotations,
        "--images",
        root,
        "--out",
        tmp_path / "x.h5",
        "--clip-model",
        "no-such-org/no-such-clip",
        "--num-workers",
        "0",
    )
    error = assert_one_line_error(result)
    assert "not a local directory" in error and "pass DIR" in error


def test_killed_run_resumes_to_the_same_file(tmp_path, shapes, clip_dir):
    annotations, root = shapes
    reference = tmp_path / "reference.h5"
    args = [
        "--clip-model",
        clip_dir,
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--shard-size",
        "4",
    ]
    run_cli("extract-features", annotations, "--images", root, "--out", reference, *args, check=0)

    out = tmp_path / "resumed.h5"
    parts = tmp_path / "resumed.h5.parts"
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "cli.py"),
            "extract-features",
            str(annotations),
            "--images",
            str(root),
            "--out",
            str(out),
            *map(str, args),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(parts.glob("shard-000003.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "the run finished before it could be killed"
    done_before = len(list(parts.glob("shard-*.safetensors")))
    assert 0 < done_before < 52

    result = run_cli(
        "extract-features", annotations, "--images", root, "--out", out, *args, check=0
    )
    assert "resumed after" in result.stdout
    with h5py.File(reference) as a, h5py.File(out) as b:
        assert set(a) == set(b)
        for name in a:
            np.testing.assert_array_equal(a[name][()], b[name][()])


# Pinned: the start of the first cached row of the shapes dataset, encoded by the seeded tiny CLIP
# (`build_tiny_clip(seed=0)`) and stored as float16. It catches any change to image decoding,
# preprocessing, the encoder call or the storage dtype. To regenerate, print
# `read_cache(shapes_cache).embeddings[0, :6].tolist()`. Change it only with the reason in the
# commit message.
PINNED_FIRST_ROW = [
    -0.94287109375,
    -1.806640625,
    -2.263671875,
    -0.6611328125,
    0.66455078125,
    0.630859375,
]


def test_pinned_embedding_row(shapes_cache):
    cache = read_cache(shapes_cache)
    assert cache.image_ids[0] == "0"
    # float16 holds about 3 significant digits; one unit in the last place is allowed.
    np.testing.assert_allclose(cache.embeddings[0, :6], PINNED_FIRST_ROW, rtol=0, atol=2e-3)


@pytest.mark.bad_input("traceback")
def test_a_nul_character_in_a_caption_is_one_line_and_nothing_is_written(
    tmp_path, shapes, clip_dir
):
    _, root = shapes
    image = sorted((root / "images").iterdir())[0].relative_to(root)
    annotations = tmp_path / "a.jsonl"
    annotations.write_text(json.dumps({"image": str(image), "caption": "a red\u0000 circle"}))
    result = extract(annotations, root, tmp_path / "f.h5", clip_dir)
    line = assert_one_line_error(result)
    assert "has a NUL character in its id, path or captions" in line, line
    assert not (tmp_path / "f.h5").exists()
    assert not list(tmp_path.glob("f.h5*")), "refused on reading, before any image is encoded"
