"""The order of an epoch's samples: a plain shuffle, or batches grouped by caption length.

`epoch_order` is what `loop.train_one_epoch` slices its batches from. With `group_by_length` it
follows the Hugging Face Trainer's `group_by_length` (`LengthGroupedSampler`): shuffle, cut the
shuffled samples into mega-batches of 50 batches, sort each mega-batch by length, and cut it into
batches. The captions of a batch then have nearly the same length, so little of the padded
(B, T) batch is padding and a step costs what its tokens cost.

Two choices differ from the Trainer's:

- The batches are shuffled after they are cut (the Trainer keeps each mega-batch's batches from
  longest to shortest), so the model does not see 50 batches of falling length over and over.
- As in the Trainer, the batch holding the longest caption comes first, so a batch size that does
  not fit in memory fails at the first step rather than hours into the run. A short last batch
  stays last, since the loop takes batch b as `order[b * batch_size : (b + 1) * batch_size]`.

The training loop groups by optimizer step: its `batch_size` here is `--batch-size` times
`--grad-accum`, and a step's micro-batches are consecutive slices of one grouped batch. Each
micro-batch is then as short as a batch of its own would be, and a step of N accumulated
micro-batches sees the captions one batch of N times the size would.

The order is a pure function of the lengths, the batch size, the seed and the epoch, so every
torchrun rank computes the same one and a resumed run continues it exactly. It depends on the
batch size, so a run stopped mid-epoch resumes with grouping only at its own batch size per step
(`check_resume`). Without grouping the order is the shuffle training has always used.
"""

import numpy as np
import torch

from clipcap_cache.errors import ClipcapError
from clipcap_cache.training.objectives import CrossEntropy

MEGA_BATCHES = 50  # batches per mega-batch, as in the Hugging Face Trainer


def epoch_order(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> np.ndarray:
    """Every sample index once, in the order of the epoch's batches.

    Args:
        lengths: (N,) each sample's length in tokens; only their order matters.
        batch_size: samples per batch (the global batch under torchrun).
        seed: the run's seed.
        epoch: the epoch, counted from 0; each epoch has its own order.
        group_by_length: batch samples of similar length together. With all lengths equal
            there is nothing to group, and the plain shuffle is returned.

    Returns:
        (N,) int64 sample indices; batch b is `order[b * batch_size : (b + 1) * batch_size]`.

    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    # Modulo 2**64, the generator's range: the same seeds as ever for seeds below 2**54.
    generator = torch.Generator().manual_seed((seed * 1000 + epoch) % 2**64)
    shuffled = torch.randperm(n, generator=generator).numpy()
    if not group_by_length or n == 0 or lengths.min() == lengths.max():
        return shuffled
    mega = MEGA_BATCHES * batch_size
    # Longest first within each mega-batch; the stable sort keeps the shuffle among equal lengths.
    grouped = np.concatenate(
        [
            chunk[np.argsort(-lengths[chunk], kind="stable")]
            for chunk in np.split(shuffled, range(mega, n, mega))
        ]
    )
    # Every mega-batch but the last is a whole number of batches, so no full batch spans two.
    full = n // batch_size
    batches = grouped[: full * batch_size].reshape(full, batch_size)
    rest = grouped[full * batch_size :]
    if full == 0:
        return rest
    batches = batches[torch.randperm(full, generator=generator).numpy()]
    longest = int(np.argmax(lengths[batches].max(axis=1)))
    batches[[0, longest]] = batches[[longest, 0]]
    return np.concatenate([batches.reshape(-1), rest])


def sample_lengths(objective) -> np.ndarray:
    """(N,) the length of each sample of an objective, for `epoch_order`.

    Under cross-entropy a sample is a caption, and its length is its labelled tokens (EOS
    included), the T it adds to a padded batch. Under self-critical training a sample is an image
    whose captions are sampled during the step, so their lengths are not known in advance (and
    a batch is as long as its longest sample, whichever the images): every image gets the same
    length, and grouping leaves the shuffle as it is.
    """
    if isinstance(objective, CrossEntropy):
        data = objective.data
        return data.offsets[data.captions + 1] - data.offsets[data.captions]
    return np.ones(len(objective), dtype=np.int64)


def check_resume(saved_train: dict, config, captions_done: int) -> None:
    """Refuse a mid-epoch resume whose epoch order would differ from the one the run started.

    Args:
        saved_train: the `train` section of the resumed checkpoint's config.
        config: the resuming run's `TrainConfig`.
        captions_done: samples of the current epoch already trained on.

    Raises:
        ClipcapError: grouping was switched, or the batch size changed while grouping, mid-epoch
            under cross-entropy (a new order would repeat some captions and skip others).

    """
    if captions_done == 0 or config.objective != "xe":
        return
    was_grouped = bool(saved_train.get("group_by_length", False))  # older runs did not group
    old_batch = saved_train.get("batch_size", config.batch_size)
    old_accum = saved_train.get("grad_accum", 1)
    if was_grouped != config.group_by_length:
        flag = "--group-by-length" if was_grouped else "--no-group-by-length"
        raise ClipcapError(
            f"--resume: the run stopped {captions_done} captions into an epoch ordered with "
            f"{flag}; resume with {flag}, or at the start of an epoch"
        )
    if was_grouped and old_batch * old_accum != config.batch_size * config.grad_accum:
        step = f"--batch-size {old_batch}" + (f" --grad-accum {old_accum}" if old_accum > 1 else "")
        raise ClipcapError(
            f"--resume: the run stopped {captions_done} captions into an epoch whose batches "
            f"were grouped by length for {step}; resume with {step}: another batch size per "
            "step groups the captions in another order"
        )
