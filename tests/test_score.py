"""`clipcap score`: captions of any system against COCO, Karpathy or cache references."""

import json

import pytest
from conftest import assert_one_line_error, run_cli
from test_clipscore import assert_clipscore_from_the_cache

from clipcap_cache.data.annotations import read_annotations


@pytest.fixture(scope="module")
def test_split(shapes, tmp_path_factory):
    """The shapes test split as an official-style COCO captions file, and predictions for it."""
    annotations, _ = shapes
    records = [r for r in read_annotations(annotations) if r.split == "test"]
    folder = tmp_path_factory.mktemp("score")
    coco = {
        "images": [{"id": int(r.image_id), "file_name": r.path} for r in records],
        "annotations": [
            {"id": i, "image_id": int(r.image_id), "caption": c}
            for i, (r, c) in enumerate((r, c) for r in records for c in r.captions)
        ],
    }
    (folder / "captions_test.json").write_text(json.dumps(coco))
    predictions = [
        {"image_id": int(r.image_id), "caption": r.captions[0] if i % 2 else "a photo of a thing"}
        for i, r in enumerate(records)
    ]
    (folder / "results.json").write_text(json.dumps(predictions))
    return folder, annotations


def score(*args, check=None):
    return run_cli("score", *args, check=check)


def test_coco_karpathy_and_cache_references_give_the_same_scores(
    test_split, shapes_cache, tmp_path
):
    folder, karpathy = test_split
    results = folder / "results.json"
    sources = {
        "coco": [folder / "captions_test.json"],
        "karpathy": [karpathy, "--split", "test"],
        "cache": [shapes_cache, "--split", "test"],
    }
    found = {}
    for name, source in sources.items():
        out = tmp_path / name
        score(results, "--references", *source, "--no-bertscore", "--out", out, check=0)
        found[name] = json.loads((out / "metrics.json").read_text())
    assert found["coco"]["images"] == 24
    assert found["coco"]["metrics"] == found["karpathy"]["metrics"] == found["cache"]["metrics"]
    # Half the captions are references, half are wrong: a middling CIDEr, far from 0 and 10.
    assert 1.0 < found["coco"]["metrics"]["CIDEr"] < 8.0


def test_offline_bertscore_is_skipped_and_the_rest_is_written(test_split, tmp_path):
    folder, _ = test_split
    out = tmp_path / "out"
    # The default BERTScore model (roberta-large) cannot be fetched: the hub is off in tests.
    result = score(
        folder / "results.json",
        "--references",
        folder / "captions_test.json",
        "--out",
        out,
        check=0,
    )
    assert "BERTScore skipped" in result.stderr
    written = json.loads((out / "metrics.json").read_text())
    assert "BERTScore" in written["skipped"] and "CIDEr" in written["metrics"]


def test_clipscore_comes_from_the_cache(test_split, shapes_cache, clip_dir, tmp_path):
    folder, _ = test_split
    score(
        folder / "results.json",
        "--references",
        folder / "captions_test.json",
        "--no-bertscore",
        "--features",
        shapes_cache,
        "--clipscore",
        "--out",
        tmp_path,
        check=0,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    # The same scores as CLIPScore computed directly from the cache's rows of those images.
    predictions = json.loads((folder / "results.json").read_text())
    assert_clipscore_from_the_cache(metrics, predictions, shapes_cache, clip_dir)


@pytest.mark.bad_input("message")
@pytest.mark.parametrize(
    "predictions, message",
    [
        (
            '[{"image_id": "184", "caption": "x"}]',
            "has image_id '184'; the image ids of the references are integers",
        ),
        ('[{"image_id": 5, "caption": "x"}]', "image_id 5 is not in the references"),
        (
            '[{"image_id": 184, "caption": "x"}]',
            "23 of the 24 images of the references have no prediction",
        ),
    ],
    ids=["string-id", "unknown-image", "missing-images"],
)
def test_bad_predictions_get_one_line(test_split, tmp_path, predictions, message):
    folder, _ = test_split
    path = tmp_path / "results.json"
    path.write_text(predictions)
    result = score(path, "--references", folder / "captions_test.json", "--no-bertscore")
    assert message in assert_one_line_error(result)


@pytest.mark.bad_input("message")
def test_clipscore_without_features_is_refused(test_split):
    folder, _ = test_split
    result = score(
        folder / "results.json", "--references", folder / "captions_test.json", "--clipscore"
    )
    assert "--clipscore needs --features" in assert_one_line_error(result)


def run_python(*args, timeout=180):
    """A fresh Python process with this checkout first on the path; returns it once it ended."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


needs_java = pytest.mark.skipif(
    __import__("shutil").which("java") is None, reason="METEOR needs Java"
)


@needs_java
@pytest.mark.bad_input("traceback")
def test_a_caption_of_ten_thousand_words_is_scored_and_the_process_exits(test_split, tmp_path):
    from conftest import REPO

    folder, _ = test_split
    predictions = json.loads((folder / "results.json").read_text())
    predictions[0]["caption"] = " ".join(f"word{i % 50}" for i in range(10_000))
    (tmp_path / "long.json").write_text(json.dumps(predictions))
    args = ["score", tmp_path / "long.json", "--references", folder / "captions_test.json"]
    # Before, METEOR's Java scorer died on it and the process then waited at exit for ever.
    done = run_python(REPO / "cli.py", *args, "--no-bertscore", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert 0 < metrics["METEOR"] < 1


@needs_java
@pytest.mark.bad_input("traceback")
def test_a_failed_meteor_scorer_is_skipped_and_the_process_exits(tmp_path):
    script = tmp_path / "dead_meteor.py"
    script.write_text(
        "from clipcap_cache.evaluation.metrics import SafeMeteor\n"
        "meteor = SafeMeteor()\n"
        "meteor.scorer.meteor_p.kill()  # the Java process dies, as on a caption it cannot take\n"
        "meteor.scorer.meteor_p.wait()\n"
        "print(meteor.compute_score({'1': ['a red square']}, {'1': ['a red square']}))\n"
    )
    done = run_python(script, timeout=60)  # pycocoevalcap's __del__ waited for its lock for ever
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(None, None)"
    assert "METEOR skipped: its Java scorer failed" in done.stderr
