"""Bad input, as a careless or hostile user would give it: one `error:` line, exit 1, nothing lost.

Every case is marked `bad_input(CLASS)`; `python tests/count_bad_inputs.py` counts them by class.
"""

import json
import re
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, run_cli
from test_evaluate import evaluate_test_split, score_predictions
from test_extract import extract
from test_train import train_args

from clipcap_cache.data.cache import read_cache

data_loss = pytest.mark.bad_input("data loss")
parsing = pytest.mark.bad_input("parsing")
numbers = pytest.mark.bad_input("numbers")
traceback = pytest.mark.bad_input("traceback")
lock = pytest.mark.bad_input("lock")
message = pytest.mark.bad_input("message")


def snapshot(folder):
    """Every file under `folder` with its bytes, to show that nothing changed."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def old_cache(tmp_path_factory, shapes, clip_dir):
    """A complete cache of the shapes dataset, copied per test before it is attacked."""
    annotations, root = shapes
    out = tmp_path_factory.mktemp("old") / "old.h5"
    extract(annotations, root, out, clip_dir, "--limit", "8", check=0)
    return out


@pytest.fixture
def cache_copy(tmp_path, old_cache):
    path = tmp_path / "old.h5"
    shutil.copy(old_cache, path)
    return path


# ------------------------------------------------------------------ data loss


@data_loss
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--device", "cuda"], "no CUDA GPU"),
        (["--device", "cdua"], "--device must be one of"),
        (["--clip-model", "/nonexistent/clip"], "cannot load CLIP model"),
    ],
    ids=["no-cuda", "device-typo", "missing-clip-model"],
)
def test_a_failed_extract_overwrite_keeps_the_old_cache_and_blocks_no_retry(
    tmp_path, shapes, clip_dir, cache_copy, extra, expected
):
    annotations, root = shapes
    before = cache_copy.read_bytes()
    args = ["--limit", "4", "--overwrite", *extra]
    error = assert_one_line_error(extract(annotations, root, cache_copy, clip_dir, *args))
    assert expected in error
    assert cache_copy.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.h5"]  # no .parts, no .lock
    # The corrected command is not blocked by anything the failed one left.
    extract(annotations, root, cache_copy, clip_dir, "--limit", "4", "--overwrite", check=0)
    assert len(read_cache(cache_copy).image_ids) == 4


@data_loss
def test_an_overwrite_whose_images_all_fail_keeps_the_old_cache(tmp_path, clip_dir, cache_copy):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"not an image")
    annotations = tmp_path / "bad.csv"
    annotations.write_text("image,caption\na.jpg,x\nmissing.jpg,y\n")
    before = cache_copy.read_bytes()
    error = assert_one_line_error(extract(annotations, root, cache_copy, clip_dir, "--overwrite"))
    assert "no image could be read" in error
    assert cache_copy.read_bytes() == before


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, shapes_cache, gpt2_dir):
    out = tmp_path_factory.mktemp("runs") / "old"
    run_cli(*train_args(shapes_cache, out, gpt2_dir, "--epochs", "1", "--no-val"), check=0)
    return out


@data_loss
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--device", "cuda"], "no CUDA GPU"),
        (["--precision", "fp33"], "--precision must be one of"),
        (["--gpt2-model", "/nonexistent/gpt2"], "cannot load GPT-2"),
        (["--val-features", "/nonexistent/val.h5"], "feature cache not found"),
    ],
    ids=["no-cuda", "precision-typo", "missing-gpt2", "missing-val-cache"],
)
def test_a_failed_train_overwrite_keeps_the_old_run(
    tmp_path, old_run, shapes_cache, gpt2_dir, extra, expected
):
    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    before = snapshot(run)
    args = train_args(shapes_cache, run, gpt2_dir, "--overwrite", *extra)
    assert expected in assert_one_line_error(run_cli(*args))
    assert snapshot(run) == before
    assert not (tmp_path / "run.lock").exists()


@data_loss
@pytest.mark.parametrize(
    "extra",
    [["--device", "cdua"], ["--precision", "fp33"], ["--gpt2-model", "/nonexistent/gpt2"]],
    ids=["device", "precision", "gpt2-model"],
)
def test_a_failed_train_start_leaves_nothing_that_blocks_the_retry(
    tmp_path, shapes_cache, gpt2_dir, extra
):
    out = tmp_path / "run"
    assert_one_line_error(run_cli(*train_args(shapes_cache, out, gpt2_dir, *extra)))
    assert not out.exists() or not any(out.iterdir())
    run_cli(*train_args(shapes_cache, out, gpt2_dir, "--epochs", "1", "--no-val"), check=0)


# ------------------------------------------------------------------ parsing


def read(tmp_path, name, content):
    from clipcap_cache.data.annotations import read_annotations

    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    return read_annotations(path)


@parsing
def test_csv_is_parsed_by_csv_rules(tmp_path):
    content = (
        'image,caption\r\na.png,"a thing\non a table"\r\nb.png,"odd \u2028 separator"\r\n'
        'c.png,"form\x0cfeed"\r\n'
    )
    records = read(tmp_path, "a.csv", content)
    assert [(r.path, r.captions) for r in records] == [
        ("a.png", ["a thing\non a table"]),
        ("b.png", ["odd \u2028 separator"]),
        ("c.png", ["form\x0cfeed"]),
    ]


@parsing
def test_json_lines_split_at_line_feeds_only(tmp_path):
    rows = [{"image": "a.png", "caption": "line \u2028 separator \x85 and \x0c inside"}]
    records = read(
        tmp_path, "a.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    assert [r.captions for r in records] == [["line \u2028 separator \x85 and \x0c inside"]]


@parsing
@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "a.jsonl",
            '{"image": "a.png", "caption": ["a", "b"]}\n',
            "line 1 has a caption that is not a string",
        ),
        (
            "b.jsonl",
            '{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": null}\n',
            "line 2 has a caption",
        ),
        (
            "c.json",
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.png"}],
                    "annotations": [{"image_id": 1, "caption": 5}],
                }
            ),
            "annotations[0] has a caption that is not a string",
        ),
        (
            "d.json",
            json.dumps(
                {"images": [{"filename": "a.png", "split": "train", "sentences": [{"raw": None}]}]}
            ),
            "sentences[0] has a caption that is not a string",
        ),
        ("e.jsonl", '{"image": 7, "caption": "x"}\n', "has no image path"),
    ],
    ids=["jsonl-list", "jsonl-null", "coco-number", "karpathy-null", "jsonl-image-number"],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_place(tmp_path, name, content, expected):
    from clipcap_cache.errors import ClipcapError

    with pytest.raises(ClipcapError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        read(tmp_path, name, content)


@parsing
@pytest.mark.parametrize(
    "image",
    ["/etc/hostname", "../outside.png", "a/../../outside.png"],
    ids=["absolute", "up", "nested-up"],
)
def test_image_paths_must_stay_inside_the_image_root(tmp_path, image):
    from clipcap_cache.errors import ClipcapError

    with pytest.raises(ClipcapError, match="outside the image root"):
        read(tmp_path, "a.csv", f"image,caption\n{image},x\n")


@parsing
def test_image_paths_are_normalised_into_one_image(tmp_path):
    records = read(
        tmp_path,
        "a.csv",
        "image,caption,split\n./x.png,one,val\nx.png,two,val\nd/./y.png,three,val\n",
    )
    assert [(r.path, r.captions) for r in records] == [
        ("x.png", ["one", "two"]),
        ("d/y.png", ["three"]),
    ]


@parsing
def test_images_without_captions_are_left_out_and_counted(tmp_path, shapes, clip_dir):
    _, root = shapes
    names = sorted(p.name for p in (root / "images").iterdir())[:4]
    annotations = tmp_path / "a.csv"
    annotations.write_text(
        "image,caption\n"
        f"images/{names[0]},a red circle\n"
        f"images/{names[1]},\n"  # empty caption: the image has none
        f"images/{names[2]},   \n"
        f"images/{names[3]},a blue square\n"
    )
    out = tmp_path / "f.h5"
    result = extract(annotations, root, out, clip_dir, check=0)
    assert "2 without captions left out" in result.stdout
    cache = read_cache(out)
    assert cache.image_paths == [f"images/{names[0]}", f"images/{names[3]}"]
    assert cache.captions == ["a red circle", "a blue square"]


# ------------------------------------------------------------------ numbers


@numbers
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm must be greater than 0"),
        (["--max-grad-norm", "0"], "--max-grad-norm must be greater than 0"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--weight-decay", "-1"], "--weight-decay must be at least 0"),
        (["--projector-layers", "0"], "--projector-layers must be at least 1"),
        (["--warmup-steps", "-5"], "--warmup-steps must be at least 0"),
    ],
    ids=[
        "grad-norm-negative",
        "grad-norm-zero",
        "lr-inf",
        "lr-nan",
        "weight-decay",
        "layers",
        "warmup",
    ],
)
def test_a_bad_number_on_the_command_line_is_refused_before_the_run(
    tmp_path, shapes_cache, gpt2_dir, extra, expected
):
    out = tmp_path / "run"
    assert expected in assert_one_line_error(
        run_cli(*train_args(shapes_cache, out, gpt2_dir, *extra))
    )
    assert not out.exists()


@numbers
@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"lr": "abc"}', "--lr must be a finite number, not 'abc'"),
        ('{"epochs": 1.5}', "--epochs must be an integer, not 1.5"),
        ('{"batch_size": null}', "--batch-size must be an integer, not None"),
        ('{"prefix_length": 4.0}', "--prefix-length must be an integer, not 4.0"),
        ('{"gpt2_model": 7}', "--gpt2-model must be text, not 7"),
        ('{"normalize_prefix": "yes"}', "--normalize-prefix must be true or false"),
    ],
    ids=["lr-text", "epochs-float", "batch-null", "prefix-float", "model-number", "flag-text"],
)
def test_a_bad_value_in_a_config_file_is_refused(
    tmp_path, shapes_cache, gpt2_dir, content, expected
):
    config = tmp_path / "options.json"
    config.write_text(content)
    out = tmp_path / "run"
    args = train_args(shapes_cache, out, gpt2_dir)
    # Drop the flag the file sets, so that the file's value is the one used.
    key = "--" + next(iter(json.loads(content))).replace("_", "-")
    if key in args:
        i = args.index(key)
        del args[i : i + 2]
    error = assert_one_line_error(run_cli(*args, "--config", config))
    assert expected in error
    assert not out.exists()


@numbers
@pytest.mark.parametrize("kind", ["latin-1", "directory"])
def test_an_unreadable_config_file_is_refused(tmp_path, shapes_cache, gpt2_dir, kind):
    config = tmp_path / "options.json"
    if kind == "latin-1":
        config.write_bytes('{"lr": 0.001, "note": "café"}'.encode("latin-1"))
    else:
        config.mkdir()
    error = assert_one_line_error(
        run_cli(*train_args(shapes_cache, tmp_path / "run", gpt2_dir), "--config", config)
    )
    assert ("UTF-8" in error) if kind == "latin-1" else ("is a directory" in error)


@numbers
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--num-workers", "-1"], "--num-workers at least 0"),
        (["--beams", "0"], "--beams must be at least 1"),
        (["--top-p", "nan", "--sample"], "--top-p must be a finite number"),
    ],
    ids=["workers", "beams", "top-p-nan"],
)
def test_a_bad_caption_option_is_refused(checkpoint_run, shapes, extra, expected):
    _, root = shapes
    image = sorted((root / "images").iterdir())[0]
    result = run_cli("caption", image, "--checkpoint", checkpoint_run, "--device", "cpu", *extra)
    assert expected in assert_one_line_error(result)


@numbers
@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.__setitem__("clip_model", 7), "'clip_model' is 7"),
        (
            lambda c: c["model"].__setitem__("prefix_length", 4.0),
            "--prefix-length must be an integer",
        ),
        (lambda c: c.__setitem__("format_version", "1"), "format version '1'"),
    ],
    ids=["clip-model-number", "prefix-float", "version-text"],
)
def test_a_checkpoint_config_with_bad_values_is_refused(
    tmp_path, checkpoint_run, shapes, edit, expected
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_run / "checkpoints" / "best", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    _, root = shapes
    image = sorted((root / "images").iterdir())[0]
    result = run_cli("caption", image, "--checkpoint", ckpt, "--device", "cpu")
    assert expected in assert_one_line_error(result)


# ------------------------------------------------------------------ tracebacks


def broken_cache(path, source, edit):
    shutil.copy(source, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _replace(name, data):
    def edit(f):
        del f[name]
        f.create_dataset(name, data=data)

    return edit


@traceback
@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda f: f.__delitem__("captions"), "no /captions"),
        (_replace("caption_image_index", np.full(16, 99, np.int64)), "points outside /embeddings"),
        (_replace("embeddings", np.zeros(8, np.float16)), "expected (N, D)"),
        (
            _replace("embeddings", np.zeros((5, 64), np.float16)),
            "/image_ids has 8 rows, /embeddings 5",
        ),
        (_replace("embeddings", np.full((8, 64), np.inf, np.float16)), "hold NaN or inf"),
    ],
    ids=["no-captions", "index-out-of-range", "one-dimensional", "short", "infinite"],
)
@pytest.mark.parametrize("command", ["inspect", "train"])
def test_a_damaged_cache_gets_one_line(tmp_path, old_cache, gpt2_dir, edit, expected, command):
    cache = broken_cache(tmp_path / "broken.h5", old_cache, edit)
    if command == "inspect":
        result = run_cli("inspect", cache)
    else:
        result = run_cli(*train_args(cache, tmp_path / "run", gpt2_dir))
    assert expected in assert_one_line_error(result)


@traceback
def test_output_paths_that_cannot_be_written_are_refused_first(
    tmp_path, shapes, clip_dir, checkpoint_run, shapes_cache, gpt2_dir
):
    annotations, root = shapes
    folder = tmp_path / "folder.h5"
    folder.mkdir()
    assert "is a directory" in assert_one_line_error(
        extract(annotations, root, folder, clip_dir, "--overwrite")
    )
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in assert_one_line_error(
        run_cli(*train_args(shapes_cache, a_file, gpt2_dir))
    )
    assert "cannot write" in assert_one_line_error(
        run_cli(*train_args(shapes_cache, a_file / "run", gpt2_dir))
    )
    result = run_cli(
        "evaluate", checkpoint_run, "--features", shapes_cache, "--out", a_file, "--no-bertscore"
    )
    assert "is a file" in assert_one_line_error(result)
    assert "is a file" in assert_one_line_error(run_cli("demo", "--workdir", a_file))
    assert "cannot write" in assert_one_line_error(run_cli("demo", "--workdir", a_file / "demo"))
    image = sorted((root / "images").iterdir())[0]
    result = run_cli(
        "caption", image, "--checkpoint", checkpoint_run, "--out", tmp_path / "missing" / "c.txt"
    )
    assert "does not exist" in assert_one_line_error(result)
    assert a_file.read_text() == "x"


@traceback
def test_an_unwritable_checkpoint_folder_mid_run_gets_one_line(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    # Root ignores file permissions, so the disk "fills up" instead: the third save fails.
    from clipcap_cache import checkpoint

    real_save, calls = checkpoint.save_checkpoint, []

    def save_on_a_full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_on_a_full_disk)
    out = tmp_path / "run"
    args = train_args(shapes_cache, out, gpt2_dir, "--epochs", "1", "--save-every-steps", "3")
    error = assert_one_line_error(run_cli(*args, "--no-val"))
    assert "No space left on device" in error and "--resume" in error
    monkeypatch.undo()
    run_cli(
        *train_args(shapes_cache, out, gpt2_dir, "--epochs", "1", "--resume", "--no-val"), check=0
    )


# ------------------------------------------------------------------ locks


# Another process that holds an output's lock for a minute, or until it is killed.
HOLD_LOCK = """
import sys, time
from clipcap_cache.files import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


@lock
def test_a_second_process_on_the_same_output_is_refused_until_the_first_dies(
    tmp_path, shapes, clip_dir
):
    annotations, root = shapes
    out = tmp_path / "f.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        error = assert_one_line_error(extract(annotations, root, out, clip_dir, "--limit", "4"))
        assert f"in use by another clipcap process (pid {holder.pid})" in error
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # An flock dies with its process: the next run goes ahead.
    extract(annotations, root, out, clip_dir, "--limit", "4", check=0)
    assert not (tmp_path / "f.h5.lock").exists()


@lock
def test_a_second_training_run_on_the_same_directory_is_refused(tmp_path, shapes_cache, gpt2_dir):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = train_args(shapes_cache, out, gpt2_dir, "--overwrite")
        error = assert_one_line_error(run_cli(*args))
        assert f"in use by another clipcap process (pid {holder.pid})" in error
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run_cli(*train_args(shapes_cache, out, gpt2_dir, "--epochs", "1", "--no-val"), check=0)


# ------------------------------------------------------------------ messages


@message
def test_a_run_killed_before_its_first_best_checkpoint_says_so(
    tmp_path, checkpoint_run, shapes_cache
):
    run = tmp_path / "run"
    shutil.copytree(checkpoint_run / "checkpoints" / "last", run / "checkpoints" / "last")
    error = assert_one_line_error(
        run_cli("evaluate", run, "--features", shapes_cache, "--no-bertscore")
    )
    assert "no best checkpoint yet" in error and str(run / "checkpoints" / "last") in error


@message
def test_a_clip_folder_given_as_gpt2_gets_a_short_line(tmp_path, shapes_cache, clip_dir):
    error = assert_one_line_error(run_cli(*train_args(shapes_cache, tmp_path / "run", clip_dir)))
    assert "is a 'clip' model, not a GPT-2-family model" in error and len(error) < 200


@message
def test_a_model_folder_without_tokenizer_files_gets_a_short_line(tmp_path, shapes_cache, gpt2_dir):
    bare = tmp_path / "bare-gpt2"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_dir / name, bare / name)
    error = assert_one_line_error(run_cli(*train_args(shapes_cache, tmp_path / "run", bare)))
    assert "cannot load GPT-2 tokenizer" in error and len(error) < 400


@message
def test_a_nan_loss_before_any_checkpoint_says_none_was_saved(tmp_path, shapes_cache, gpt2_dir):
    args = train_args(shapes_cache, tmp_path / "run", gpt2_dir, "--lr", "1e38", "--no-val")
    error = assert_one_line_error(run_cli(*args))
    assert "No checkpoint had been saved yet" in error


@message
def test_a_run_resumes_from_another_working_directory(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    shutil.copytree(gpt2_dir, tmp_path / "models" / "gpt2")
    monkeypatch.chdir(tmp_path)
    args = train_args(shapes_cache, "runs/a", "models/gpt2", "--epochs", "1", "--no-val")
    run_cli(*args, check=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # No --gpt2-model: the run's own, recorded as an absolute path, is used.
    run_cli(
        "train",
        shapes_cache,
        "--out",
        tmp_path / "runs" / "a",
        "--resume",
        "--epochs",
        "2",
        "--replan-schedule",
        check=0,
    )
    rows = (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


@message
def test_tabs_and_newlines_in_file_names_are_escaped_in_text_output(
    tmp_path, checkpoint_run, shapes
):
    _, root = shapes
    weird = tmp_path / "a\tb\nc.png"
    shutil.copy(sorted((root / "images").iterdir())[0], weird)
    text = run_cli(
        "caption", weird, "--checkpoint", checkpoint_run, "--device", "cpu", check=0
    ).stdout
    lines = text.strip().split("\n")
    assert len(lines) == 1 and lines[0].split("\t")[0] == str(weird).replace("\t", "\\t").replace(
        "\n", "\\n"
    )
    as_json = run_cli(
        "caption",
        weird,
        "--checkpoint",
        checkpoint_run,
        "--device",
        "cpu",
        "--format",
        "json",
        check=0,
    ).stdout
    assert json.loads(as_json)[0]["image"] == str(weird)


@message
def test_evaluate_prints_only_its_own_lines(tmp_path, trained_run, shapes_cache):
    result = evaluate_test_split(
        trained_run, shapes_cache, tmp_path / "eval", "--greedy", "--no-bertscore"
    )
    assert "testlen" not in result.stdout and "ratio:" not in result.stdout
    assert "" not in result.stdout.splitlines()
    assert "testlen" in (tmp_path / "eval" / "evaluate.log").read_text()


@message
def test_partial_predictions_are_scored_with_a_warning(tmp_path, checkpoint_run, shapes_cache):
    cache = read_cache(shapes_cache)
    rows = cache.rows_of_split("test")[:3]
    predictions = tmp_path / "p.json"
    predictions.write_text(
        json.dumps([{"image_id": int(cache.image_ids[r]), "caption": "a red circle"} for r in rows])
    )
    result = score_predictions(
        checkpoint_run, shapes_cache, predictions, tmp_path / "eval", check=0
    )
    assert f"covers 3 of the split's {len(cache.rows_of_split('test'))} images" in result.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 3


# The bad-input cases per class when these floors were set. A class may grow; a class that
# shrinks has lost tests, and a smaller number here must say why in the commit message.
BAD_INPUT_FLOORS = {
    "data loss": 70,
    "parsing": 44,
    "numbers": 29,
    "bad option": 35,
    "traceback": 59,
    "lock": 2,
    "message": 64,
    "silent wrong result": 42,
}
# How the README names each marker class.
README_CLASS_NAMES = {
    "data loss": "data loss",
    "parsing": "parsing",
    "numbers": "numbers",
    "bad options": "bad option",
    "one-line errors instead of tracebacks": "traceback",
    "locks": "lock",
    "messages": "message",
    "silent wrong results": "silent wrong result",
}


def readme_bad_input_counts() -> dict[str, int]:
    """The per-class counts and the total that the README states."""
    text = " ".join((REPO / "README.md").read_text().split())
    found = re.search(
        r"The suite has (\d+) bad-input test cases in \w+ classes \(.*?\): (.*?)\.", text
    )
    assert found, "the README no longer states the bad-input counts"
    counts = {"total": int(found[1])}
    for name, number in re.findall(r"([a-z][a-z -]*?) (\d+)(?:,|$)", found[2]):
        counts[README_CLASS_NAMES[name.strip()]] = int(number)
    return counts


def test_every_class_keeps_its_cases_and_the_readme_states_the_count():
    # The counting script finds the cases by their marker; a case without one is not counted.
    # It collects the whole suite in this process, where the test modules are already imported.
    from count_bad_inputs import count

    counts = count()
    assert set(counts) == {*BAD_INPUT_FLOORS, "total"}
    assert counts["total"] == sum(counts[name] for name in BAD_INPUT_FLOORS)
    shrunk = {
        name: counts[name] for name, floor in BAD_INPUT_FLOORS.items() if counts[name] < floor
    }
    assert not shrunk, f"bad-input classes lost cases: {shrunk} (floors {BAD_INPUT_FLOORS})"
    assert readme_bad_input_counts() == counts


def without_captions_of(source, path, rows_to_strip, drop_rows=False):
    """A copy of a cache whose given rows lose their captions, or are removed altogether."""
    from clipcap_cache.data.cache import write_cache

    cache = read_cache(source)
    strip = set(int(r) for r in rows_to_strip)
    keep_rows = [r for r in range(len(cache.image_ids)) if not (drop_rows and r in strip)]
    new_row = {old: new for new, old in enumerate(keep_rows)}
    keep_captions = [i for i, r in enumerate(cache.caption_image_index) if int(r) not in strip]
    write_cache(
        path,
        embeddings=cache.embeddings[keep_rows],
        image_ids=[cache.image_ids[r] for r in keep_rows],
        image_paths=[cache.image_paths[r] for r in keep_rows],
        splits=[str(cache.splits[r]) for r in keep_rows],
        captions=[cache.captions[i] for i in keep_captions],
        caption_image_index=[new_row[int(cache.caption_image_index[i])] for i in keep_captions],
        failed_paths=[],
        failed_reasons=[],
        attrs=cache.attrs,
    )
    return path


@parsing
def test_images_without_references_in_an_older_cache_are_left_out(
    tmp_path, shapes_cache, gpt2_dir, minilm_dir, trained_run
):
    # Caches of earlier versions could hold images with no caption. Validation and evaluation
    # leave them out: the val loss equals that of a cache without those images at all, and
    # BERTScore and pycocoevalcap do not crash on an empty reference list.
    cache = read_cache(shapes_cache)
    stripped = np.concatenate([cache.rows_of_split("val")[:4], cache.rows_of_split("test")[:4]])
    holes = without_captions_of(shapes_cache, tmp_path / "holes.h5", stripped)
    gone = without_captions_of(shapes_cache, tmp_path / "gone.h5", stripped, drop_rows=True)

    def val_loss(features, name):
        out = tmp_path / name
        args = train_args(features, out, gpt2_dir, "--epochs", "1", "--eval-images", "6")
        args.remove("--no-bertscore")
        run_cli(*args, "--bertscore-model", minilm_dir, "--bertscore-layers", "6", check=0)
        return json.loads((out / "metrics.jsonl").read_text())

    with_holes, without = val_loss(holes, "holes"), val_loss(gone, "gone")
    assert with_holes["val_loss"] == pytest.approx(without["val_loss"], rel=1e-6)
    assert with_holes["bertscore_f1"] == pytest.approx(without["bertscore_f1"], rel=1e-6)

    result = evaluate_test_split(
        trained_run, holes, tmp_path / "eval", "--greedy", "--no-bertscore"
    )
    assert "4 images of the split have no reference caption" in result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == len(cache.rows_of_split("test")) - 4
