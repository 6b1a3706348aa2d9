import csv
import io
import json
import shutil

import pytest
from conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shapes, captioner):
    """Three shapes images whose best captions differ, so that no caption fits a wrong image."""
    _, root = shapes
    folder = tmp_path_factory.mktemp("photos")
    chosen, seen = [], set()
    for path in sorted((root / "images").iterdir()):
        best = captioner([path])[0][0]["caption"]
        if best not in seen:
            seen.add(best)
            chosen.append(path)
        if len(chosen) == 3:
            break
    for i, path in enumerate(chosen):
        shutil.copy(path, folder / f"p{i}.png")
    (folder / "sub").mkdir()
    shutil.copy(folder / "p0.png", folder / "sub" / "deep.png")
    return folder


def caption(run, *args):
    return run_cli("caption", *args, "--checkpoint", run, "--device", "cpu", "--batch-size", "2")


def best_caption(captioner, path, **options) -> str:
    return captioner([path], **options)[0][0]["caption"]


def test_text_output_is_one_line_per_image_with_its_own_caption(trained_run, photos, captioner):
    result = caption(trained_run, photos)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    paths = [photos / f"p{i}.png" for i in range(3)]
    assert lines == [[str(p), best_caption(captioner, p)] for p in paths]
    assert len({text for _, text in lines}) == 3
    recursive = caption(trained_run, photos, "--recursive").stdout.strip().splitlines()
    deep = photos / "sub" / "deep.png"
    assert recursive == [*map("\t".join, lines), f"{deep}\t{best_caption(captioner, deep)}"]


def test_structured_formats_parse(trained_run, photos, tmp_path, captioner):
    glob = str(photos / "p*.png")
    out = tmp_path / "c.json"
    assert (
        caption(
            trained_run,
            glob,
            "--format",
            "json",
            "--out",
            out,
            "--num-captions",
            "2",
            "--beams",
            "3",
        ).returncode
        == 0
    )
    data = json.loads(out.read_text())
    assert [d["image"] for d in data] == [str(photos / f"p{i}.png") for i in range(3)]
    for d in data:
        expected = captioner([d["image"]], beams=3, num_captions=2)[0]
        assert d["captions"] == [c["caption"] for c in expected]
    lines = caption(trained_run, glob, "--format", "jsonl", "--greedy").stdout.strip().splitlines()
    assert [json.loads(line)["captions"] for line in lines] == [
        [c["caption"] for c in captioner([photos / f"p{i}.png"], greedy=True)[0]] for i in range(3)
    ]
    rows = list(
        csv.DictReader(
            io.StringIO(
                caption(
                    trained_run, glob, "--format", "csv", "--sample", "--num-captions", "2"
                ).stdout
            )
        )
    )
    assert len(rows) == 6 and {r["rank"] for r in rows} == {"1", "2"}


@pytest.mark.bad_input("parsing")
def test_bad_images_are_reported_and_the_rest_captioned(trained_run, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 nope")
    result = caption(
        trained_run,
        photos / "p0.png",
        broken,
        tmp_path / "missing.png",
        photos / "p1.png",
        "--format",
        "json",
    )
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert [bool(d["captions"]) for d in data] == [True, False, False, True]
    assert data[1]["error"] == "not an image" and data[2]["error"] == "missing file"
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.bad_input("traceback")
def test_bad_checkpoints_get_one_line_errors(checkpoint_run, shapes, tmp_path):
    # Refused before any image is read: any images will do, and no trained model is needed.
    photos = shapes[1] / "images"
    assert "not found" in assert_one_line_error(caption(tmp_path / "nothing", photos))
    bad_version = tmp_path / "v"
    shutil.copytree(checkpoint_run / "checkpoints" / "best", bad_version)
    config = json.loads((bad_version / "config.json").read_text())
    (bad_version / "config.json").write_text(json.dumps({**config, "format_version": 7}))
    assert "format version 7" in assert_one_line_error(caption(bad_version, photos))
    wrong_base = tmp_path / "w"
    shutil.copytree(checkpoint_run / "checkpoints" / "best", wrong_base)
    config["model"]["gpt2_model"] = "no-such-org/no-such-gpt2"
    (wrong_base / "config.json").write_text(json.dumps(config))
    assert "not a local directory" in assert_one_line_error(caption(wrong_base, photos))
    wrong_shape = tmp_path / "s"
    shutil.copytree(checkpoint_run / "checkpoints" / "best", wrong_shape)
    config = json.loads((checkpoint_run / "checkpoints" / "best" / "config.json").read_text())
    config["model"]["prefix_length"] = 7
    (wrong_shape / "config.json").write_text(json.dumps(config))
    assert "shape" in assert_one_line_error(caption(wrong_shape, photos))


@pytest.mark.bad_input("silent wrong result")
def test_a_symlink_loop_under_a_glob_captions_each_file_once(trained_run, shapes, tmp_path):
    import glob

    from clipcap_cache.inference.caption import expand_inputs

    _, root = shapes
    (tmp_path / "loop" / "a").mkdir(parents=True)
    shutil.copy(sorted((root / "images").iterdir())[0], tmp_path / "loop" / "a" / "x.png")
    (tmp_path / "loop" / "a" / "up").symlink_to("..")  # a loop: a/up/a/up/... is a/ again
    (tmp_path / "loop" / "a" / "link.png").symlink_to("x.png")  # the same file by another name
    pattern = str(tmp_path / "loop" / "**" / "*.png")
    assert len(glob.glob(pattern, recursive=True)) > 40  # what the standard glob finds
    result = caption(trained_run, pattern, "--recursive", "--format", "json")
    assert result.returncode == 0, result.stderr
    images = [entry["image"] for entry in json.loads(result.stdout)]
    assert images == [str(tmp_path / "loop" / "a" / "link.png")]
    # Two loops in one folder made the standard glob's walk exponential; this stays instant.
    (tmp_path / "loop" / "a" / "up2").symlink_to("..")
    assert len(expand_inputs([pattern], recursive=True)) == 1
    assert expand_inputs([str(tmp_path / "loop")], recursive=True) == [
        tmp_path / "loop" / "a" / "link.png"
    ]


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize(
    "options, message",
    [
        (["--seed", "99999999999999999999"], "--seed must be at most 9223372036854775807"),
        (["--temperature", "1e-300"], "--temperature must be between 0.01 and 100"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
        (["--top-p", "nan"], "--top-p must be a finite number"),
        # The tiny GPT-2 has 128 positions, 4 of them for the prefix.
        (["--max-tokens", "300"], "--max-tokens 300 is more than this model can generate"),
        (["--beams", "10000"], "--beams must be at most 100"),
    ],
)
def test_decoding_options_beyond_the_model_are_one_line(trained_run, shapes, options, message):
    image = sorted((shapes[1] / "images").iterdir())[0]
    sample = [] if "--beams" in options else ["--sample"]
    line = assert_one_line_error(caption(trained_run, image, *sample, *options))
    assert message in line
    assert "at most 124" in line or "--max-tokens" not in options
