"""`train_one_epoch`: one pass over the shuffled samples of an objective."""

import contextlib
import math
import time

import torch
from tqdm.auto import tqdm

from clipcap_cache import distributed
from clipcap_cache.errors import ClipcapError
from clipcap_cache.model import ClipCaptionModel
from clipcap_cache.training import batches
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.optimization import Optimization
from clipcap_cache.training.run_dir import RunDirectory, save_training_checkpoint
from clipcap_cache.training.state import TrainState

SYNC_SECONDS = 0.5  # how often the host reads the loss back from the device (progress, NaN check)
SYNC_STEPS = 20  # the same, in optimizer steps, under torchrun (where every rank must take part)


def train_one_epoch(
    model: ClipCaptionModel,
    forward,
    objective,
    optimization: Optimization,
    state: TrainState,
    config: TrainConfig,
    amp_dtype: torch.dtype | None,
    run: RunDirectory,
) -> dict:
    """One pass over the shuffled samples, from `state.batch` on; returns the epoch's row.

    `objective` is `CrossEntropy` (a sample is a caption) or `scst.SelfCritical` (a sample is an
    image). `forward` is the model, or its DDP or compiled form. Every `config.save_every_steps`
    optimizer steps the run saves a resume point in `checkpoints/last`.
    """
    model.train()
    device = next(model.parameters()).device
    world = distributed.world()
    epoch = state.epoch
    batches_per_epoch = math.ceil(len(objective) / config.batch_size)
    order = batches.epoch_order(
        batches.sample_lengths(objective),
        config.batch_size,
        config.seed,
        epoch,
        config.group_by_length,
    )
    bar = tqdm(
        total=batches_per_epoch,
        initial=state.batch,
        unit="batch",
        desc=f"epoch {epoch + 1}/{config.epochs}",
        dynamic_ncols=True,
        leave=False,
        disable=not world.is_main,
    )
    started = time.perf_counter() - state.seconds
    # The summed loss stays on the device between syncs, so the host does not wait for the GPU
    # at every step. Steps of a full-size model on the CPU take longer than SYNC_SECONDS, so
    # there every step syncs.
    pending = torch.zeros(len(objective.metrics), device=device)  # summed over the samples
    first_batch = state.batch
    synced_batch, synced_at = first_batch, time.perf_counter()
    try:
        for b in range(first_batch, batches_per_epoch):
            group_start = b - b % config.grad_accum
            group_end = min(group_start + config.grad_accum, batches_per_epoch)
            if b in (group_start, first_batch):
                # A resume with another --grad-accum may start mid-group: its group starts there.
                start = max(group_start, first_batch)
                group = order[start * config.batch_size : group_end * config.batch_size]
                group_tokens = objective.count(group)
            # The batch is global: each rank takes every world.size-th sample of it (under scst,
            # whole images, each with all of its sampled captions).
            samples = order[b * config.batch_size : (b + 1) * config.batch_size]
            tokens = objective.count(samples)
            mine = samples[world.rank :: world.size]
            my_tokens = objective.count(mine)
            if len(mine) == 0:
                # A short last batch may leave a rank nothing; it still joins the gradient
                # all-reduce, with a sample weighted zero.
                mine = samples[:1]
            # Weighting each micro-batch by its share of the group's tokens (images under scst)
            # makes the accumulated gradient that of the mean loss over the whole group, as one
            # large batch would give. DDP averages over ranks, so each rank's share is scaled by
            # their number.
            weight = my_tokens / group_tokens * world.size
            sync_gradients = b + 1 == group_end or world.size == 1
            with contextlib.nullcontext() if sync_gradients else forward.no_sync():
                means = objective.forward_backward(
                    model, forward, mine, weight, optimization.scaler, amp_dtype, epoch
                )
            pending += means * my_tokens
            state.tokens += tokens
            state.captions += len(samples)
            bar.update(1)
            if b + 1 < group_end:
                continue
            state.step += 1
            saving = (
                config.save_every_steps
                and state.step % config.save_every_steps == 0
                and b + 1 < batches_per_epoch
            )
            # Several ranks must meet at the same steps to sum their losses, so they sync on a
            # step count; one process syncs on the clock.
            due = (
                state.step % SYNC_STEPS == 0
                if world.size > 1
                else time.perf_counter() - synced_at > SYNC_SECONDS
            )
            if saving or b + 1 == batches_per_epoch or due:
                # Every save is preceded by this check, so a non-finite loss never reaches a
                # checkpoint.
                values = distributed.all_reduce_sum(pending).tolist()
                value = values[0]
                if not math.isfinite(value):
                    last = run.path / "checkpoints" / "last"
                    kept = (
                        f"The last good checkpoint is kept in {last}"
                        if last.exists()
                        else "No checkpoint had been saved yet"
                    )
                    raise ClipcapError(
                        f"the loss became {value} in epoch {epoch + 1}, batches "
                        f"{synced_batch + 1}-{b + 1}; stopping. {kept}. Try a lower --lr or "
                        "--precision fp32"
                    )
                state.loss_sum += value
                for name, total in zip(objective.metrics[1:], values[1:], strict=True):
                    state.sums[name] = state.sums.get(name, 0.0) + total
                pending.zero_()
                synced_batch, synced_at = b + 1, time.perf_counter()
                shown = {"loss": f"{state.loss_sum / state.tokens:.3f}"}
                if "reward" in state.sums:
                    shown["reward"] = f"{state.sums['reward'] / state.tokens:.3f}"
                rate = state.captions / max(synced_at - started, 1e-9)
                shown["img_s" if objective.unit == "image" else "cap_s"] = f"{rate:.1f}"
                bar.set_postfix(**shown)
            optimization.step()
            state.batch = b + 1
            if saving:
                state.seconds = time.perf_counter() - started
                save_training_checkpoint(run, "last", model, state, optimization)
    finally:
        bar.close()  # before any error message, so it starts a line of its own
    seconds = time.perf_counter() - started
    return {
        "epoch": epoch + 1,
        "step": state.step,
        "train_loss": state.loss_sum / max(state.tokens, 1),
        **{name: total / max(state.tokens, 1) for name, total in state.sums.items()},
        "lr": optimization.scheduler.get_last_lr()[0],
        "seconds": round(seconds, 3),
        f"{objective.unit}s_per_second": round(state.captions / max(seconds, 1e-9), 2),
    }
