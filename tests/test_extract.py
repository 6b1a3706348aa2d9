import json
import signal
import subprocess
import sys
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
