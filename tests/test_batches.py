"""Length-grouped batches (`--group-by-length`): the order itself, and training runs that use it."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_train import PINNED_UNGROUPED_LOSSES, crash_after_step, library_run, train_args

from clipcap_cache.checkpoint import load_train_state
from clipcap_cache.errors import ClipcapError
from clipcap_cache.training.batches import MEGA_BATCHES, epoch_order


def coco_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Caption lengths with a mean of about 12 tokens and a long tail, as COCO's GPT-2 lengths."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(11.5), 0.28, n)), 6, 40).astype(np.int64)


def padding_fraction(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> float:
    """Share of the padded (B, T) batches that is padding."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        padded += batch.max() * len(batch)
        real += batch.sum()
    return 1 - real / padded


@pytest.mark.parametrize("n, batch_size", [(10_000, 40), (4_001, 40), (2_039, 7), (5, 8), (1, 1)])
def test_every_sample_once_per_epoch(n, batch_size):
    lengths = coco_like_lengths(n)
    for epoch in range(3):
        order = epoch_order(lengths, batch_size, seed=1, epoch=epoch, group_by_length=True)
        assert order.dtype == np.int64
        assert np.array_equal(np.sort(order), np.arange(n))


def test_grouped_batches_have_far_less_padding_than_random():
    lengths = coco_like_lengths(20_000)
    grouped = epoch_order(lengths, 40, seed=0, epoch=0, group_by_length=True)
    shuffled = epoch_order(lengths, 40, seed=0, epoch=0, group_by_length=False)
    random_padding = padding_fraction(shuffled, lengths, 40)
    grouped_padding = padding_fraction(grouped, lengths, 40)
    assert random_padding > 0.3  # lengths 6-40 in one batch: the longest sets T
    assert grouped_padding < 0.1 * random_padding, (grouped_padding, random_padding)


def test_the_order_is_fixed_by_seed_and_epoch():
    lengths = coco_like_lengths(3_000)

    def order(seed, epoch):
        return epoch_order(lengths, 16, seed=seed, epoch=epoch, group_by_length=True)

    assert np.array_equal(order(3, 1), order(3, 1))
    assert not np.array_equal(order(3, 1), order(3, 2))
    assert not np.array_equal(order(3, 1), order(4, 1))
    # Batches are shuffled, not only the samples within them: the sequence of batch lengths
    # neither falls within each mega-batch (the Trainer's order) nor repeats between epochs.
    batch_max = lengths[order(3, 1)][: 16 * MEGA_BATCHES].reshape(MEGA_BATCHES, 16).max(axis=1)
    assert not np.all(np.diff(batch_max[1:]) <= 0)


def test_without_grouping_the_order_is_the_plain_shuffle():
    # The order training used before grouping existed: runs without the flag are unchanged.
    lengths = coco_like_lengths(500)
    for epoch in range(2):
        plain = torch.randperm(500, generator=torch.Generator().manual_seed(7 * 1000 + epoch))
        assert np.array_equal(epoch_order(lengths, 16, 7, epoch, False), plain.numpy())
        # Equal lengths (self-critical training's images) leave nothing to group.
        same = epoch_order(np.ones(500, dtype=np.int64), 16, 7, epoch, True)
        assert np.array_equal(same, plain.numpy())


def test_the_longest_batch_comes_first_and_a_short_batch_last():
    lengths = coco_like_lengths(4_010)
    lengths[1234] = 60  # the one longest caption
    order = epoch_order(lengths, 40, seed=5, epoch=0, group_by_length=True)
    assert 1234 in order[:40]
    # 4010 = 100 full batches and 10 left over, which stay at the end.
    full = lengths[order[:4000]].reshape(100, 40)
    tail = lengths[order[4000:]]
    assert len(tail) == 10
    assert full.max(axis=1).argmax() == 0


def run_weights(run):
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def test_a_grouped_run_resumes_to_the_same_weights(tmp_path, monkeypatch, shapes_cache, gpt2_dir):
    grouped = ["--group-by-length", "--save-every-steps", "1"]
    reference = tmp_path / "reference"
    run_cli(*train_args(shapes_cache, reference, gpt2_dir, *grouped), check=0)
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    # Other batches than the pinned ungrouped run of the same settings, and a loss as low.
    for row, pinned in zip(rows, PINNED_UNGROUPED_LOSSES, strict=True):
        assert row["train_loss"] != pytest.approx(pinned["train_loss"], rel=1e-4)
        assert row["val_loss"] == pytest.approx(pinned["val_loss"], rel=0.05)

    # Stopped mid-way through epoch 2 (20 steps an epoch), right after a resume point is saved.
    resumed = tmp_path / "resumed"
    crash_after_step(monkeypatch, 27)
    result = run_cli(*train_args(shapes_cache, resumed, gpt2_dir, *grouped))
    assert result.returncode != 0
    assert load_train_state(resumed / "checkpoints" / "last")["step"] == 27
    # The resume takes --group-by-length from the run's config.json.
    resume = train_args(shapes_cache, resumed, gpt2_dir, "--resume")
    run_cli(*resume, check=0)
    a, b = run_weights(reference), run_weights(resumed)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.bad_input("data loss")
def test_a_mid_epoch_resume_that_would_reorder_the_epoch_is_refused(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    def run(out, **kwargs):
        return library_run(out, shapes_cache, gpt2_dir, monkeypatch, **kwargs)

    out = tmp_path / "grouped"
    run(out, group_by_length=True, crash_at=2)  # 16 captions in
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(ClipcapError, match="grouped by length for --batch-size 8"):
        run(out, group_by_length=True, batch_size=16, resume=True)
    # Grouping is by optimizer step: accumulating 2 batches of 8 groups by 16.
    with pytest.raises(ClipcapError, match="grouped by length for --batch-size 8;"):
        run(out, group_by_length=True, grad_accum=2, resume=True)
    with pytest.raises(ClipcapError, match="resume with --group-by-length"):
        run(out, group_by_length=False, resume=True)
    after = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before
    # The same batch size continues: 2 steps done, 38 left of 320 captions in batches of 8.
    assert run(out, group_by_length=True, resume=True)["step"] == 40

    # Through the CLI, one line.
    plain = tmp_path / "plain"
    run(plain, group_by_length=False, crash_at=1)
    error = assert_one_line_error(
        run_cli("train", shapes_cache, "--out", plain, "--resume", "--group-by-length")
    )
    assert "resume with --no-group-by-length" in error


@pytest.mark.bad_input("data loss")
def test_a_run_saved_before_grouping_existed_resumes_on_the_plain_shuffle(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    out = tmp_path / "old"
    library_run(out, shapes_cache, gpt2_dir, monkeypatch, group_by_length=False, crash_at=2)
    # Such a run's configs do not name the option.
    for path in (out / "config.json", out / "checkpoints" / "last" / "config.json"):
        saved = json.loads(path.read_text())
        del saved["train"]["group_by_length"]
        path.write_text(json.dumps(saved))
    # The default is grouping now; the resume keeps the order the run started with.
    result = run_cli("train", shapes_cache, "--out", out, "--resume", check=0)
    assert json.loads(result.stdout.splitlines()[-1])["step"] == 40
    assert json.loads((out / "config.json").read_text())["train"]["group_by_length"] is False


@pytest.mark.slow
def test_two_processes_group_like_one(tmp_path, shapes_cache, gpt2_no_dropout_dir):
    from test_distributed import torchrun, weights

    extra = ["--epochs", "1", "--no-val", "--save-every-steps", "0", "--group-by-length"]
    one = tmp_path / "one"
    run_cli(*train_args(shapes_cache, one, gpt2_no_dropout_dir, *extra), check=0)
    two = tmp_path / "two"
    torchrun(*train_args(shapes_cache, two, gpt2_no_dropout_dir, *extra))
    a, b = weights(one), weights(two)
    for name in a:
        # The tolerance of the ungrouped two-process test (test_distributed.py).
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=3e-5)
    row_one = json.loads((one / "metrics.jsonl").read_text())
    row_two = json.loads((two / "metrics.jsonl").read_text())
    assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], rel=1e-5)
