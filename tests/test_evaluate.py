import json
import os
import shutil
from pathlib import Path

import bert_score
import pytest
from conftest import assert_one_line_error, run_cli
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from clipcap_cache.data.cache import read_cache
from clipcap_cache.evaluation.metrics import java_available

needs_java = pytest.mark.skipif(not java_available(), reason="the COCO metrics need Java")


def evaluate_test_split(checkpoint, cache, out, *extra):
    """`clipcap evaluate` on the test split on the CPU, captions of at most 12 tokens."""
    return run_cli(
        "evaluate",
        checkpoint,
        "--features",
        cache,
        "--split",
        "test",
        "--out",
        out,
        "--max-tokens",
        "12",
        "--device",
        "cpu",
        *extra,
        check=0,
    )


def score_predictions(checkpoint, cache, predictions, out, check=None):
    """`clipcap evaluate --predictions FILE`, without BERTScore."""
    return run_cli(
        "evaluate",
        checkpoint,
        "--features",
        cache,
        "--predictions",
        predictions,
        "--no-bertscore",
        "--out",
        out,
        check=check,
    )


@needs_java
def test_metrics_equal_direct_pycocoevalcap_and_bert_score(
    trained_run, shapes_cache, minilm_dir, tmp_path
):
    out = tmp_path / "eval"
    result = evaluate_test_split(
        trained_run,
        shapes_cache,
        out,
        "--beams",
        "2",
        "--bertscore-model",
        minilm_dir,
        "--bertscore-layers",
        "6",
    )
    assert "CIDEr" in result.stdout
    predictions = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    cache = read_cache(shapes_cache)
    rows = cache.rows_of_split("test")
    assert sorted(p["image_id"] for p in predictions) == sorted(
        int(cache.image_ids[r]) for r in rows
    )

    references = cache.references()
    gts = {str(cache.image_ids[r]): [{"caption": c} for c in references[r]] for r in rows}
    res = {str(p["image_id"]): [{"caption": p["caption"]}] for p in predictions}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert metrics["Bleu_1"] > 0.3

    ids = [str(p["image_id"]) for p in predictions]
    refs = {str(cache.image_ids[r]): references[r] for r in rows}
    precision, recall, f1 = bert_score.score(
        [p["caption"] for p in predictions],
        [refs[i] for i in ids],
        model_type=minilm_dir,
        num_layers=6,
    )
    assert metrics["bertscore_precision"] == pytest.approx(precision.mean().item(), abs=1e-5)
    assert metrics["bertscore_recall"] == pytest.approx(recall.mean().item(), abs=1e-5)
    assert metrics["bertscore_f1"] == pytest.approx(f1.mean().item(), abs=1e-5)

    # Scoring the predictions file again, without generating, gives the same numbers.
    again = tmp_path / "again"
    score_predictions(trained_run, shapes_cache, out / "predictions.json", again, check=0)
    rescored = json.loads((again / "metrics.json").read_text())
    assert rescored["metrics"]["CIDEr"] == pytest.approx(metrics["CIDEr"])
    assert rescored["skipped"] == ["BERTScore"]


@pytest.mark.bad_input("parsing")
@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "predictions file not found"),
        ("[{", "not valid JSON"),
        ('{"image_id": 1, "caption": "x"}', "expected a list"),
        ('[{"image_id": 1}]', "entry 0 needs 'image_id' and 'caption'"),
        ('[{"image_id": 999999, "caption": "x"}]', "image_id 999999 is not in the evaluated split"),
        ("[]", "no predictions"),
        # 184 is the first test image of the shapes dataset (160 train, 24 val, then test).
        ('[{"image_id": 184, "caption": null}]', "entry 0 has a caption that is not text"),
        (
            '[{"image_id": 184, "caption": "a"}, {"image_id": 184, "caption": "b"}]',
            "image_id 184 has more than one caption",
        ),
    ],
    ids=[
        "missing",
        "not-json",
        "not-a-list",
        "no-caption",
        "unknown-image",
        "empty",
        "null-caption",
        "duplicate",
    ],
)
def test_a_bad_predictions_file_gets_one_line(
    checkpoint_run, shapes_cache, tmp_path, content, expected
):
    # Checked before any scoring, so no Java is needed.
    predictions = tmp_path / "predictions.json"
    if content is not None:
        predictions.write_text(content)
    out = tmp_path / "out"
    error = assert_one_line_error(score_predictions(checkpoint_run, shapes_cache, predictions, out))
    assert expected in error
    assert not out.exists()


@pytest.mark.bad_input("message")
@needs_java
def test_spice_without_corenlp_gets_one_line(checkpoint_run, shapes_cache, tmp_path):
    import pycocoevalcap.spice as spice_package

    jar = Path(spice_package.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar"
    if jar.is_file():
        pytest.skip("Stanford CoreNLP is installed here, so SPICE would run")
    error = assert_one_line_error(
        run_cli(
            "evaluate",
            checkpoint_run,
            "--features",
            shapes_cache,
            "--no-bertscore",
            "--spice",
            "--out",
            tmp_path / "o",
        )
    )
    assert "--spice needs Stanford CoreNLP 3.6.0" in error


@needs_java  # compares the run without Java against one with it
def test_without_java_meteor_is_skipped_and_the_rest_match(
    trained_run, shapes_cache, tmp_path, monkeypatch
):
    def score(out):
        evaluate_test_split(trained_run, shapes_cache, out, "--greedy", "--no-bertscore")
        return json.loads((out / "metrics.json").read_text())

    with_java = score(tmp_path / "java")
    java_dir = os.path.realpath(os.path.dirname(shutil.which("java")))
    path = os.environ["PATH"].split(os.pathsep)
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in path if os.path.realpath(d) != java_dir))
    assert not java_available()

    without = score(tmp_path / "no-java")
    assert "METEOR" not in without["metrics"]
    assert set(without["skipped"]) == {"METEOR", "PTB tokenizer", "BERTScore"}
    # The shapes captions hold nothing the PTB tokenizer treats specially, so the fallback
    # tokenizer must give the same scores.
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert without["metrics"][name] == pytest.approx(with_java["metrics"][name], abs=1e-9)

    error = assert_one_line_error(
        run_cli("evaluate", trained_run, "--features", shapes_cache, "--spice", "--no-bertscore")
    )
    assert "Java" in error


def test_offline_bertscore_is_skipped_and_the_coco_metrics_are_written(
    checkpoint_run, shapes_cache, tmp_path
):
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"image_id": 184, "caption": "a red circle"}]))
    out = tmp_path / "out"
    # The default BERTScore model, roberta-large, cannot be fetched: the hub is off in tests.
    result = run_cli(
        "evaluate",
        checkpoint_run,
        "--features",
        shapes_cache,
        "--predictions",
        predictions,
        "--out",
        out,
        check=0,
    )
    assert "BERTScore skipped" in result.stderr
    written = json.loads((out / "metrics.json").read_text())
    assert "BERTScore" in written["skipped"] and "CIDEr" in written["metrics"]


@pytest.fixture(scope="module")
def text_id_cache(tmp_path_factory, shapes_cache):
    """The shapes cache with img2dataset's zero-padded keys, and a Unicode digit as one id."""
    from clipcap_cache.data.cache import write_cache

    cache = read_cache(shapes_cache)
    path = tmp_path_factory.mktemp("cache") / "text-ids.h5"
    ids = ["²" if row == 0 else f"{row + 1:09d}" for row in range(len(cache.image_ids))]
    write_cache(
        path,
        embeddings=cache.embeddings,
        image_ids=ids,
        image_paths=cache.image_paths,
        splits=[str(s) for s in cache.splits],
        captions=cache.captions,
        caption_image_index=cache.caption_image_index,
        failed_paths=[],
        failed_reasons=[],
        attrs=cache.attrs,
    )
    return path


@pytest.mark.bad_input("silent wrong result")
def test_zero_padded_ids_round_trip_through_evaluate_and_score(
    checkpoint_run, text_id_cache, tmp_path
):
    out = tmp_path / "eval"
    evaluate_test_split(checkpoint_run, text_id_cache, out, "--split", "all")
    first = json.loads((out / "metrics.json").read_text())
    ids = [p["image_id"] for p in json.loads((out / "predictions.json").read_text())]
    assert "000000002" in ids and 2 not in ids
    # Its own predictions are scored again, as they are, to the same numbers.
    again = tmp_path / "again"
    predictions = out / "predictions.json"
    evaluate_test_split(
        checkpoint_run, text_id_cache, again, "--split", "all", "--predictions", predictions
    )
    assert json.loads((again / "metrics.json").read_text())["metrics"] == first["metrics"]
    scored = run_cli(
        "score",
        out / "predictions.json",
        "--references",
        text_id_cache,
        "--no-bertscore",
        check=0,
    )
    assert "CIDEr" in scored.stdout


@pytest.mark.bad_input("traceback")
def test_a_unicode_digit_image_id_is_text_and_the_results_are_written(
    checkpoint_run, text_id_cache, tmp_path
):
    # "²".isdigit() is true, and int("²") fails: once after every metric had been computed.
    out = tmp_path / "eval"
    evaluate_test_split(checkpoint_run, text_id_cache, out, "--split", "all")
    predictions = json.loads((out / "predictions.json").read_text())
    assert "²" in [p["image_id"] for p in predictions]
    assert "CIDEr" in json.loads((out / "metrics.json").read_text())["metrics"]


@pytest.mark.bad_input("data loss")
def test_predictions_of_another_system_never_replace_the_runs_own_results(
    checkpoint_run, shapes_cache, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(checkpoint_run, run)
    evaluate_test_split(run, shapes_cache, run / "eval-test")
    own = {p.name: p.read_bytes() for p in (run / "eval-test").iterdir() if p.suffix == ".json"}
    test_ids = [
        read_cache(shapes_cache).image_ids[r]
        for r in read_cache(shapes_cache).rows_of_split("test")
    ]
    other = tmp_path / "other_model.json"
    other.write_text(json.dumps([{"image_id": int(k), "caption": "hello"} for k in test_ids]))

    result = run_cli(
        "evaluate",
        run,
        "--features",
        shapes_cache,
        "--predictions",
        other,
        "--no-bertscore",
        check=0,
    )
    after = {p.name: p.read_bytes() for p in (run / "eval-test").iterdir() if p.suffix == ".json"}
    assert after == own
    written = json.loads((tmp_path / "other_model-eval-test" / "metrics.json").read_text())
    assert written["checkpoint"] is None and written["predictions"] == str(other)
    assert f"wrote {tmp_path / 'other_model-eval-test'}/predictions.json" in result.stdout

    # Nor may --out name the folder of the predictions it reads.
    error = assert_one_line_error(
        score_predictions(
            run, shapes_cache, run / "eval-test" / "predictions.json", run / "eval-test"
        )
    )
    assert "holds the --predictions file" in error
    after = {p.name: p.read_bytes() for p in (run / "eval-test").iterdir() if p.suffix == ".json"}
    assert after == own
