"""`bash benchmarks/gpu/run.sh --smoke OUT_DIR`: the GPU suite's code, run on the CPU at tiny sizes."""

import json
import shutil
import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

ROWS = (
    "CUDA tests (pytest -m cuda)",
    "setup (models, images, caches)",
    "extraction, PIL decoding in workers",
    "extraction, GPU JPEG decoding",
    "training, batch 40, fp32",
    "training, bf16 + torch.compile",
    "training, largest batch that fits",
    "projected COCO Karpathy epoch",
    "SCST step",
    "decoding, beam 5",
    "clipcap serve",
    "whole suite",
)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_smoke_run_measures_every_row(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "--smoke", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["smoke"] is True
    rows = report["rows"]
    for name in ROWS:
        assert any(row["row"].startswith(name) for row in rows), name
    assert not [row for row in rows if str(row.get("note", "")).startswith("failed")]
    measured = {row["row"]: row for row in rows if "value" in row}
    for row in measured.values():
        if row["unit"] != "passed":
            assert row["value"] > 0, row
    # On the CPU every CUDA test skips, and none fails.
    tests = next(row for row in rows if row["row"].startswith("CUDA tests"))
    assert tests["failed"] == 0 and tests["value"] == 0 and tests["skipped"] >= 8
    # The projected epoch follows from the best training rate.
    train = measured["training, batch 40, fp32"]["value"]
    epoch = next(r for r in rows if r["row"].startswith("projected COCO"))
    assert epoch["value"] == pytest.approx(566_747 / train / 60, rel=0.05)  # train is rounded
    # The same table, as Markdown, on stdout and in results.md.
    table = (out / "results.md").read_text()
    assert table in result.stdout
    assert table.count("\n| ") == len(rows) + 1  # a header and one line per row


def test_a_wrong_command_line_gets_its_usage(tmp_path):
    result = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "usage: bash benchmarks/gpu/run.sh [--smoke] OUT_DIR" in result.stderr
