"""Readers only read: captioning, evaluating or inspecting a run never renames its checkpoints.

A save swaps a checkpoint folder in with two renames (`NAME` -> `NAME.old`, `NAME.tmp` -> `NAME`).
A reader that arrives between them reads the complete new version and leaves the folders as they
are; only the trainer, which holds the run's lock, finishes a swap that a crash interrupted.
"""

import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, assert_one_line_error, run_cli

from clipcap_cache import checkpoint
from clipcap_cache.inference.captioner import Captioner
from clipcap_cache.inference.generate import DecodeConfig


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _mid_swap(run_dir, tmp_path):
    """A copy of a trained run whose best and last checkpoints stop between the two renames."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name in ("best", "last"):
        directory = copy / "checkpoints" / name
        shutil.copytree(directory, directory.with_name(name + ".tmp"))
        directory.rename(directory.with_name(name + ".old"))
    return copy


@pytest.mark.bad_input("data loss")
def test_readers_of_a_run_caught_mid_swap_read_it_and_rename_nothing(trained_run, tmp_path):
    run = _mid_swap(trained_run, tmp_path)
    before = _listing(run / "checkpoints")
    assert "best" not in before and {"best.tmp", "best.old"} <= set(before)

    assert checkpoint.resolve(run) == run / "checkpoints" / "best"
    config = checkpoint.read_config(run)
    model, _, _ = checkpoint.load_checkpoint(run)
    state = checkpoint.load_train_state(run / "checkpoints" / "last")
    captioner = Captioner.from_checkpoint(run, device="cpu", load_encoder=False)
    reference = Captioner.from_checkpoint(trained_run, device="cpu", load_encoder=False)
    assert _listing(run / "checkpoints") == before, "a reader renamed checkpoint folders"

    assert config["epoch"] == checkpoint.read_config(trained_run)["epoch"]
    assert (
        state["step"] == checkpoint.load_train_state(trained_run / "checkpoints" / "last")["step"]
    )
    embeddings = torch.randn(3, reference.model.config.clip_embedding_dim)
    greedy = DecodeConfig(strategy="greedy")
    assert captioner.caption_embeddings(embeddings, greedy) == reference.caption_embeddings(
        embeddings, greedy
    )
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_trainer_finishes_an_interrupted_swap_when_it_resumes(trained_run, tmp_path):
    run = _mid_swap(trained_run, tmp_path)
    checkpoint.recover_run(run)
    assert {"best", "last"} <= set(_listing(run / "checkpoints"))
    assert not {"best.old", "last.old", "best.tmp", "last.tmp"} & set(_listing(run / "checkpoints"))
    assert checkpoint.read_config(run)["epoch"] == checkpoint.read_config(trained_run)["epoch"]


@pytest.mark.bad_input("data loss")
def test_a_missing_train_state_in_a_complete_folder_is_one_line(trained_run, tmp_path):
    copy = tmp_path / "best-only"
    shutil.copytree(trained_run / "checkpoints" / "best", copy)
    from clipcap_cache.errors import ClipcapError

    with pytest.raises(ClipcapError, match="nothing to resume"):
        checkpoint.load_train_state(copy)


@pytest.mark.slow
@pytest.mark.bad_input("data loss")
def test_captioning_a_run_that_saves_every_step_never_breaks_either(
    tmp_path, shapes_cache, shapes, gpt2_dir, clip_dir
):
    out = tmp_path / "run"
    args = [
        "train", shapes_cache, "--out", out, "--gpt2-model", gpt2_dir, "--prefix-length", "4",
        "--epochs", "1", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
        "--device", "cpu", "--no-bertscore", "--eval-images", "0", "--save-every-steps", "1",
    ]  # fmt: skip
    trainer = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    annotations, root = shapes
    image = next(root.rglob("*.png"))
    last = out / "checkpoints" / "last"
    captioned = 0
    deadline = time.monotonic() + 600
    try:
        while trainer.poll() is None and time.monotonic() < deadline:
            if checkpoint.readable_folder(last) is None:
                time.sleep(0.05)
                continue
            result = run_cli("caption", image, "--checkpoint", last, "--greedy", "--device", "cpu")
            assert "Traceback" not in result.stderr, result.stderr
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip(), "no caption"
            captioned += 1
    finally:
        if trainer.poll() is None:
            trainer.kill()
        stderr = trainer.communicate()[1]
    assert trainer.returncode == 0, stderr
    assert captioned >= 3, f"only {captioned} captions while the run was saving"
    assert not [p for p in (out / "checkpoints").iterdir() if p.suffix in (".tmp", ".old")]


def test_a_reader_of_nothing_gets_one_line(tmp_path):
    result = run_cli("caption", tmp_path / "x.png", "--checkpoint", tmp_path / "nothing")
    assert_one_line_error(result)
