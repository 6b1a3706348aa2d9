import json

import pytest
from conftest import run_cli

from clipcap_cache.demo import COLORS, SHAPES


def named(caption: str) -> tuple[set, set]:
    words = set(caption.split())
    return words & set(COLORS), words & set(SHAPES)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(
    tmp_path, pretrained_clip_dir, pretrained_gpt2_dir
):
    workdir = tmp_path / "demo"
    result = run_cli("demo", "--workdir", workdir, check=0)
    # The demo built its two models at once, in two processes: byte-identical to the fixtures,
    # which built them one at a time.
    for built, fixture in (("clip", pretrained_clip_dir), ("gpt2", pretrained_gpt2_dir)):
        weights = (workdir / "models" / built / "model.safetensors").read_bytes()
        assert weights == (fixture / "model.safetensors").read_bytes(), built
    assert "Sample captions" in result.stdout and "CIDEr" in result.stdout
    assert "clipcap train" in result.stdout
    metrics = json.loads((workdir / "run" / "eval-test" / "metrics.json").read_text())
    assert metrics["images"] == 40 and metrics["metrics"]["Bleu_1"] > 0.5
    assert metrics["metrics"]["clipscore"] > 1.0  # the testbed CLIP: image and captions agree
    rows = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 15
    # The SCST stage continues from the cross-entropy run's best epoch and is evaluated too.
    scst_rows = [
        json.loads(r) for r in (workdir / "run-scst" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["epoch"] for row in scst_rows] == [1, 2] and "reward" in scst_rows[0]
    scst = json.loads((workdir / "run-scst" / "eval-test" / "metrics.json").read_text())
    assert scst["metrics"]["CIDEr"] > 0.8 * metrics["metrics"]["CIDEr"]
    # The retrieved column: CLIP's nearest training caption names the reference's colour and
    # shape for most of the printed test images (measured: 5 of 6).
    table = result.stdout.split("nearest training caption by CLIP:\n")[1].split("\n\n")[0]
    header, *samples = table.splitlines()
    assert header.split() == ["generated", "retrieved", "reference"] and len(samples) == 6
    start = header.index("retrieved")
    end = header.index("reference")
    right = sum(named(line[start:end]) == named(line[end:]) for line in samples)
    assert right >= 4, table

    again = run_cli("demo", "--workdir", workdir, check=0)
    assert "nothing to do" in again.stdout and "reusing it" in again.stdout
    assert again.stdout.count("reusing it") >= 3  # the models and both runs
    assert len((workdir / "run" / "metrics.jsonl").read_text().splitlines()) == 15
    assert len((workdir / "run-scst" / "metrics.jsonl").read_text().splitlines()) == 2
