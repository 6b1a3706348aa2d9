"""Training as two processes under torchrun, on the CPU with gloo, against one process.

These launch real process groups (`python -m torch.distributed.run --nproc-per-node 2`), so they
are marked slow; CI still runs them.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_extract import extract_args
from test_trackers import tensorboard_scalars
from test_train import _saved_step, train_args

from clipcap_cache.checkpoint import load_train_state

pytestmark = pytest.mark.slow


def torchrun_command(*args, processes=2):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        str(REPO / "cli.py"),
        *map(str, args),
    ]


def torchrun(*args, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        torchrun_command(*args, processes=processes),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_tree(root_pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure would."""
    signal_tree(root_pid, signal.SIGKILL)
    family = descendants(root_pid)
    # A killed process lets go of its files (and its flock) only once it has exited.
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.01)


def descendants(root_pid: int) -> list[int]:
    """A process and all its descendants, found through /proc.

    torchrun starts each worker in a session of its own, so its process group is not enough.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    family, queue = [], [root_pid]
    while queue:
        pid = queue.pop()
        family.append(pid)
        queue.extend(children.get(pid, []))
    return family


def signal_tree(root_pid: int, signum: int) -> None:
    """Send a signal to a process and every descendant at once, as Slurm signals a job step."""
    for pid in descendants(root_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited already


def weights(run):
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def test_two_processes_train_like_one_with_the_same_global_batch(
    tmp_path, shapes_cache, gpt2_no_dropout_dir
):
    # Without dropout, two ranks that each take half of every global batch of 16, with the loss
    # normalised over the batch's tokens, must follow the one-process run.
    extra = ["--epochs", "1", "--grad-accum", "2", "--no-val", "--save-every-steps", "0"]
    # Reports at steps 3, 6, 9 and 10, where every rank must take part in the loss's read-back.
    extra += ["--report-to", "tensorboard", "--log-every-steps", "3"]
    one = tmp_path / "one"
    run_cli(*train_args(shapes_cache, one, gpt2_no_dropout_dir, *extra), check=0)
    two = tmp_path / "two"
    result = torchrun(*train_args(shapes_cache, two, gpt2_no_dropout_dir, *extra))

    a, b = weights(one), weights(two)
    assert set(a) == set(b)
    for name in a:
        # Float sums run in another order across two ranks; Adam magnifies that in near-zero
        # gradients, as it does for gradient accumulation (measured: 7.7e-6 at most).
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=3e-5)
    row_one = json.loads((one / "metrics.jsonl").read_text())
    row_two = json.loads((two / "metrics.jsonl").read_text())
    assert row_two["step"] == row_one["step"] == 10  # 320 captions / (16 x 2)
    assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], rel=1e-5)
    # Each rank has a random stream of its own (for dropout), not a copy of rank 0's.
    rank_rng = load_train_state(two / "checkpoints" / "last")["torch_rng_per_rank"]
    assert len(rank_rng) == 2 and not torch.equal(rank_rng[0], rank_rng[1])

    # Only rank 0 writes: the same files as one process, each log line once. (An event file's
    # name holds the time, host and process id.)
    def files(run):
        return sorted(
            str(p.relative_to(run))
            for p in run.rglob("*")
            if p.is_file() and p.parent.name != "tensorboard"
        )

    assert files(two) == files(one)
    assert len(list((two / "tensorboard").iterdir())) == 1
    # Rank 0 reports the loss of the global batch: the curve of the one-process run.
    curve_one = tensorboard_scalars(one / "tensorboard")["train/loss"]
    curve_two = tensorboard_scalars(two / "tensorboard")["train/loss"]
    assert [step for step, _ in curve_two] == [step for step, _ in curve_one] == [3, 6, 9, 10]
    for (_, value_two), (_, value_one) in zip(curve_two, curve_one, strict=True):
        assert value_two == pytest.approx(value_one, rel=1e-5)
    log = (two / "train.log").read_text()
    assert log.count("epoch 1:") == 1
    assert "across 2 process(es)" in log and "across 2 process(es)" in result.stderr

    # A resume with another number of processes is refused in one line.
    error = assert_one_line_error(
        run_cli(*train_args(shapes_cache, two, gpt2_no_dropout_dir, "--resume", "--epochs", "2"))
    )
    assert "trained by 2 process(es), not 1" in error


def test_a_killed_two_process_run_resumes_to_the_same_weights(tmp_path, shapes_cache, gpt2_dir):
    # With dropout on, each rank draws its own masks: resuming exactly needs every rank's RNG.
    extra = ["--epochs", "1", "--no-val"]
    reference = tmp_path / "reference"
    torchrun(*train_args(shapes_cache, reference, gpt2_dir, *extra))

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        torchrun_command(
            *train_args(shapes_cache, resumed, gpt2_dir, *extra, "--save-every-steps", "1")
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    last = resumed / "checkpoints" / "last"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and _saved_step(last) < 8:
        time.sleep(0.01)
    kill_tree(process.pid)  # torchrun and both workers
    process.wait()
    killed_at = load_train_state(last)
    assert killed_at["epoch"] < 1, "the run finished before it could be killed"
    assert killed_at["world_size"] == 2 and len(killed_at["torch_rng_per_rank"]) == 2

    torchrun(*train_args(shapes_cache, resumed, gpt2_dir, *extra, "--resume"))
    a, b = weights(reference), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1]


def shard_args(shapes, clip_dir, out):
    """Extraction in shards of 4 images, batches of 2: 52 shards of the shapes dataset."""
    annotations, root = shapes
    return extract_args(annotations, root, out, clip_dir, "--shard-size", "4", batch_size=2)


def assert_same_cache(a, b):
    with h5py.File(a) as first, h5py.File(b) as second:
        assert set(first) == set(second)
        for name in first:
            np.testing.assert_array_equal(first[name][()], second[name][()], err_msg=name)


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory, shapes, clip_dir):
    out = tmp_path_factory.mktemp("extract") / "one.h5"
    run_cli(*shard_args(shapes, clip_dir, out), check=0)
    return out


def test_two_process_extraction_equals_one_process(tmp_path, shapes, clip_dir, one_process_cache):
    # Ranks encode alternate shards with the same batches, so on the CPU the rows are equal.
    out = tmp_path / "two.h5"
    result = torchrun(*shard_args(shapes, clip_dir, out))
    assert_same_cache(one_process_cache, out)
    assert not (tmp_path / "two.h5.parts").exists()
    assert result.stdout.count("wrote ") == 1  # only rank 0 reports


def test_a_killed_two_process_extraction_finishes_as_one_process(
    tmp_path, shapes, clip_dir, one_process_cache
):
    out = tmp_path / "resumed.h5"
    parts = tmp_path / "resumed.h5.parts"
    process = subprocess.Popen(
        torchrun_command(*shard_args(shapes, clip_dir, out)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while len(list(parts.glob("shard-*.safetensors"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.002)
    kill_tree(process.pid)
    process.wait()
    assert not out.exists(), "the run finished before it could be killed"
    done_before = len(list(parts.glob("shard-*.safetensors")))
    assert 0 < done_before < 52

    result = run_cli(*shard_args(shapes, clip_dir, out), check=0)  # no torchrun this time
    assert "resumed after" in result.stdout
    assert_same_cache(one_process_cache, out)


def test_two_processes_train_scst_like_one(tmp_path, shapes_cache, gpt2_no_dropout_dir):
    # Each rank takes every other image of a global batch of 16 images with all 5 of its
    # samples. The samples are keyed by image, not drawn from each rank's generator, so both
    # layouts sample the same captions, and the weighted gradients must agree.
    extra = [
        "--epochs", "1", "--grad-accum", "2", "--no-val", "--save-every-steps", "0",
        "--objective", "scst", "--max-caption-tokens", "12", "--lr", "1e-3",
    ]  # fmt: skip
    one = tmp_path / "one"
    run_cli(*train_args(shapes_cache, one, gpt2_no_dropout_dir, *extra), check=0)
    two = tmp_path / "two"
    torchrun(*train_args(shapes_cache, two, gpt2_no_dropout_dir, *extra))

    a, b = weights(one), weights(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=3e-5)
    row_one = json.loads((one / "metrics.jsonl").read_text())
    row_two = json.loads((two / "metrics.jsonl").read_text())
    assert row_two["step"] == row_one["step"] == 5  # 160 images / (16 x 2)
    for key in ("train_loss", "reward", "sample_length"):
        assert row_two[key] == pytest.approx(row_one[key], rel=1e-5), key
    assert "16 images per micro-batch across 2 process(es)" in (two / "train.log").read_text()
