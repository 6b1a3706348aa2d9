import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path):
    workdir = tmp_path / "demo"
    result = run_cli("demo", "--workdir", workdir, check=0)
    assert "Sample captions" in result.stdout and "CIDEr" in result.stdout
    assert "clipcap train" in result.stdout
    metrics = json.loads((workdir / "run" / "eval-test" / "metrics.json").read_text())
    assert metrics["images"] == 40 and metrics["metrics"]["Bleu_1"] > 0.5
    assert metrics["metrics"]["clipscore"] > 1.0  # the testbed CLIP: image and captions agree
    rows = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 15

    again = run_cli("demo", "--workdir", workdir, check=0)
    assert "nothing to do" in again.stdout and "reusing it" in again.stdout
    assert len((workdir / "run" / "metrics.jsonl").read_text().splitlines()) == 15
