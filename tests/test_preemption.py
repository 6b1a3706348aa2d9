"""Preemption: SIGTERM or SIGUSR1 stops `train` and `extract-features` cleanly, and they continue.

Real signals to real processes: the run finishes its step, saves where it is, prints one line and
exits with 143 (SIGTERM) or 138 (SIGUSR1); `--resume` then reaches the weights of a run that was
never stopped, bit for bit on the CPU.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli
from test_distributed import signal_tree, torchrun, torchrun_command, weights
from test_extract import extract_args
from test_train import train_args

from clipcap_cache.checkpoint import load_train_state
from clipcap_cache.data.cache import read_cache
from clipcap_cache.preemption import EXIT_CODES

pytestmark = pytest.mark.slow


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def start(command, log_file, env=None):
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=open(log_file, "w"),  # noqa: SIM115 (closed when the test's tmp_path goes)
        env={**os.environ, **(env or {})},
    )


def wait_for(condition, seconds=180):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def training_started(run_dir):
    log = run_dir / "train.log"
    return log.exists() and "parameters:" in log.read_text()


@pytest.mark.parametrize(
    "signum, extra",
    [
        (signal.SIGTERM, ["--epochs", "2"]),
        (
            signal.SIGUSR1,
            ["--epochs", "1", "--objective", "scst", "--samples", "2", "--max-caption-tokens", "8"],
        ),
    ],
    ids=["sigterm-xe", "sigusr1-scst"],
)
def test_a_signalled_run_saves_stops_and_resumes_bit_identically(
    tmp_path, shapes_cache, gpt2_dir, signum, extra
):
    args = ["--batch-size", "8", "--save-every-steps", "0", "--no-val", *extra]
    reference = tmp_path / "reference"
    run_cli(*train_args(shapes_cache, reference, gpt2_dir, *args), check=0)

    stopped = tmp_path / "stopped"
    log_file = tmp_path / "stderr.txt"
    command = [
        sys.executable,
        str(REPO / "cli.py"),
        *map(str, train_args(shapes_cache, stopped, gpt2_dir, *args)),
    ]
    process = start(command, log_file)
    wait_for(lambda: training_started(stopped))
    process.send_signal(signum)
    assert process.wait(timeout=120) == EXIT_CODES[signum]
    lines = [line for line in log_file.read_text().splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], log_file.read_text()
    assert "Traceback" not in log_file.read_text()
    state = load_train_state(stopped / "checkpoints" / "last")
    # Saved at a step, not at a crash: no resume point was due (--save-every-steps 0).
    assert state["step"] >= 1 and state["epoch"] < int(args[args.index("--epochs") + 1])

    run_cli(*train_args(shapes_cache, stopped, gpt2_dir, "--resume", *args), check=0)
    assert_same_weights(reference, stopped)


def test_two_signalled_processes_stop_at_the_same_step_and_resume(tmp_path, shapes_cache, gpt2_dir):
    # 320 captions in batches of 8: 40 steps, so the ranks agree to stop at step 20, mid-epoch
    # (the signal comes as training starts). Every process of the job gets it, as from Slurm.
    args = ["--epochs", "1", "--batch-size", "8", "--save-every-steps", "0", "--no-val"]
    reference = tmp_path / "reference"
    torchrun(*train_args(shapes_cache, reference, gpt2_dir, *args))

    stopped = tmp_path / "stopped"
    log_file = tmp_path / "stderr.txt"
    # One thread per process, as `torchrun` runs the reference and the resume: the same sums.
    command = torchrun_command(*train_args(shapes_cache, stopped, gpt2_dir, *args))
    process = start(command, log_file, env={"OMP_NUM_THREADS": "1"})
    wait_for(lambda: training_started(stopped))
    signal_tree(process.pid, signal.SIGTERM)
    process.wait(timeout=180)
    text = log_file.read_text()
    assert text.count("stopped by SIGTERM") == 1, text[-3000:]
    state = load_train_state(stopped / "checkpoints" / "last")
    assert state["step"] == 20 and state["epoch"] == 0 and state["world_size"] == 2

    torchrun(*train_args(shapes_cache, stopped, gpt2_dir, "--resume", *args))
    assert_same_weights(reference, stopped)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "decoding-workers"])
def test_a_signalled_extraction_stops_at_a_shard_and_a_rerun_continues(
    tmp_path, shapes, clip_dir, workers
):
    # Every process gets the signal, as Slurm sends it: decoding workers ignore it and go on
    # decoding, so the main process finishes its shard.
    annotations, root = shapes
    reference = tmp_path / "reference.h5"
    # 80 images in batches of 2 and shards of 4: many small shards, so it is still running.
    shards = ["--shard-size", "4", "--limit", "80"]
    run_cli(*extract_args(annotations, root, reference, clip_dir, *shards, batch_size=2), check=0)

    out = tmp_path / "stopped.h5"
    log_file = tmp_path / "stderr.txt"
    args = extract_args(annotations, root, out, clip_dir, *shards, batch_size=2)
    args[args.index("--num-workers") + 1] = str(workers)
    process = start([sys.executable, str(REPO / "cli.py"), *map(str, args)], log_file)
    parts = out.with_name(out.name + ".parts")
    wait_for(lambda: parts.exists() and any(parts.glob("shard-*.safetensors")))
    signal_tree(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 143, log_file.read_text()
    text = log_file.read_text()
    assert "run the same command again to continue" in text and "Traceback" not in text, text
    assert not out.exists() and any(parts.glob("shard-*.safetensors"))

    run_cli(*args, check=0)
    a, b = read_cache(reference), read_cache(out)
    assert a.image_ids == b.image_ids and (a.embeddings == b.embeddings).all()
