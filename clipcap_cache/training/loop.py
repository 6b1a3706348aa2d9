"""`train_one_epoch`: one pass over the shuffled samples of an objective.

The epoch's samples are shuffled (`epoch_order`) and cut into global batches of
`config.batch_size`; `config.grad_accum` consecutive batches make one optimizer step. Each batch
is a micro-batch (`train_micro_batch`): this rank's share of it goes forward and backward through
the objective, weighted by its share of the step's samples. The metrics are summed on the device
and read back now and then (`read_back`), which is also where a non-finite loss stops the run.
Every `config.save_every_steps` steps a resume point is saved in `checkpoints/last`, and every
`config.log_every_steps` steps, and at the epoch's last, the loss and learning rate are
reported (`report_step`) to `train.log` and the run's experiment trackers. The epoch's metrics
row (`epoch_row`) holds weighted means over its samples.
"""

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from clipcap_cache import distributed
from clipcap_cache.errors import ClipcapError
from clipcap_cache.model import ClipCaptionModel
from clipcap_cache.preemption import Preempted, StopSignals, signal_name
from clipcap_cache.training import batches
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.objectives import Objective
from clipcap_cache.training.optimization import Optimization
from clipcap_cache.training.run_dir import RunDirectory, save_training_checkpoint
from clipcap_cache.training.state import TrainState
from clipcap_cache.training.trackers import Trackers

log = logging.getLogger(__name__)
SYNC_SECONDS = 0.5  # how often the host reads the loss back from the device (progress, NaN check)
SYNC_STEPS = 20  # the same, in optimizer steps, under torchrun (where every rank must take part)


@dataclass
class DeviceSums:
    """The metrics summed on the device since the host last read them back.

    They stay on the device between read-backs, so the host does not wait for the GPU at every
    step. Steps of a full-size model on the CPU take longer than SYNC_SECONDS, so there every
    step reads back.
    """

    totals: torch.Tensor  # (len(objective.metrics),) each micro-batch's means times its weight
    first_batch: int  # the first batch of the epoch not yet read back
    read_at: float  # `time.perf_counter()` at the last read-back

    @classmethod
    def start(cls, metrics: int, device: torch.device, first_batch: int) -> "DeviceSums":
        """Nothing summed yet, from `first_batch` on."""
        return cls(torch.zeros(metrics, device=device), first_batch, time.perf_counter())


def train_one_epoch(
    model: ClipCaptionModel,
    train_module,
    objective: Objective,
    optimization: Optimization,
    state: TrainState,
    config: TrainConfig,
    amp_dtype: torch.dtype | None,
    run: RunDirectory,
    stop: StopSignals | None = None,
    trackers: Trackers | None = None,
) -> dict:
    """One pass over the shuffled samples, from `state.batch` on; returns the epoch's row.

    `objective` is `CrossEntropy` (a sample is a caption) or `scst.SelfCritical` (a sample is an
    image). `train_module` is the model, or its DDP or compiled form. Every `config.save_every_steps`
    optimizer steps the run saves a resume point in `checkpoints/last`. On SIGTERM or SIGUSR1
    (`stop`) the step is finished, the ranks agree at their next sync point, a resume point is
    saved and `Preempted` is raised; at the epoch's last step the epoch ends as usual first.
    Every `config.log_every_steps` steps, and at the last, the loss and learning rate go to
    `trackers`.
    """
    stop = stop or StopSignals()
    trackers = trackers or Trackers()
    model.train()
    world = distributed.world()
    batch_size, batches_per_epoch = config.batch_size, math.ceil(len(objective) / config.batch_size)
    order = batches.epoch_order(
        batches.sample_lengths(objective),
        batch_size * config.grad_accum,  # grouped by optimizer step: its micro-batches are slices
        config.seed,
        state.epoch,
        config.group_by_length,
    )
    bar = progress_bar(state, batches_per_epoch, config.epochs, world)
    started = time.perf_counter() - state.seconds
    first_batch = state.batch
    device = next(model.parameters()).device
    pending = DeviceSums.start(len(objective.metrics), device, first_batch)
    try:
        for b in range(first_batch, batches_per_epoch):
            group_start = b - b % config.grad_accum
            group_end = min(group_start + config.grad_accum, batches_per_epoch)
            if b in (group_start, first_batch):
                # A resume with another --grad-accum may start mid-group: its group starts there.
                group = order[max(group_start, first_batch) * batch_size : group_end * batch_size]
                group_weight = objective.count(group)
            samples = order[b * batch_size : (b + 1) * batch_size]
            pending.totals += train_micro_batch(
                model,
                train_module,
                objective,
                optimization.scaler,
                samples,
                group_weight,
                b + 1 == group_end or world.size == 1,  # the step's last: gradients all-reduced
                amp_dtype,
                state.epoch,
                world,
            )
            state.weight_sum += objective.count(samples)
            state.samples_done += len(samples)
            bar.update(1)
            if b + 1 < group_end:
                continue
            state.step += 1
            saving = saves_resume_point(state.step, b + 1, batches_per_epoch, config)
            stopping = b + 1 < batches_per_epoch and stop_due(stop, state.step, device, world)
            saving = saving or bool(stopping)
            # Every rank decides the same (all of them take part in a read-back). The epoch's last
            # step reports too, so each of its samples is in one report.
            reporting = state.step % config.log_every_steps == 0 or b + 1 == batches_per_epoch
            if saving or reporting or read_back_due(state.step, pending, world):
                read_back(pending, state, objective, run, b + 1)
                bar.set_postfix(**progress_postfix(state, objective, pending.read_at - started))
            if reporting:
                report_step(state, optimization, trackers)
            optimization.step()
            state.batch = b + 1
            if saving:
                trackers.flush()  # a killed run's curves then reach its resume point
                state.seconds = time.perf_counter() - started
                save_training_checkpoint(run, "last", model, state, optimization)
            if stopping:
                raise preempted(stopping, state, run)
    finally:
        bar.close()  # before any error message, so it starts a line of its own
    return epoch_row(state, objective, optimization, time.perf_counter() - started)


def progress_bar(
    state: TrainState, batches_per_epoch: int, epochs: int, world: distributed.World
) -> tqdm:
    """The epoch's progress bar, from the batch the run is at; shown by the main process only."""
    return tqdm(
        total=batches_per_epoch,
        initial=state.batch,
        unit="batch",
        desc=f"epoch {state.epoch + 1}/{epochs}",
        dynamic_ncols=True,
        leave=False,
        disable=not world.is_main,
    )


def train_micro_batch(
    model: ClipCaptionModel,
    train_module,
    objective: Objective,
    scaler: torch.amp.GradScaler,
    samples: np.ndarray,
    group_weight: int,
    sync_gradients: bool,
    amp_dtype: torch.dtype | None,
    epoch: int,
    world: distributed.World,
) -> torch.Tensor:
    """Forward and backward this rank's share of a global batch; returns its metrics' sums.

    `group_weight` is the summed weight (`objective.count`) of the optimizer step's samples on
    all ranks. The result (len(objective.metrics),), on the device, is the share's means times
    its weight.
    """
    # The batch is global: each rank takes every world.size-th sample of it (under scst, whole
    # images, each with all of its sampled captions).
    mine = samples[world.rank :: world.size]
    my_weight = objective.count(mine)
    if len(mine) == 0:
        # A short last batch may leave a rank nothing; it still joins the gradient all-reduce,
        # with a sample weighted zero.
        mine = samples[:1]
    # Weighting each micro-batch by its share of the group's weight (tokens, or images under
    # scst) makes the accumulated gradient that of the mean loss over the whole group, as one
    # large batch would give. DDP averages over ranks, so each rank's share is scaled by their
    # number.
    weight = my_weight / group_weight * world.size
    with contextlib.nullcontext() if sync_gradients else train_module.no_sync():
        means = objective.forward_backward(
            model, train_module, mine, weight, scaler, amp_dtype, epoch
        )
    return means * my_weight


def saves_resume_point(
    step: int, batches_done: int, batches_per_epoch: int, config: TrainConfig
) -> bool:
    """Whether the run saves a resume point after `step`; the epoch's end saves one anyway."""
    return bool(
        config.save_every_steps
        and step % config.save_every_steps == 0
        and batches_done < batches_per_epoch
    )


def stop_due(stop: StopSignals, step: int, device: torch.device, world: distributed.World) -> int:
    """The signal that stops the run after `step`, or 0 to go on.

    One process stops after the step in which the signal arrived. Several ranks must stop at the
    same step, so they agree where they read their metrics back (every SYNC_STEPS steps).
    """
    if world.size > 1 and step % SYNC_STEPS:
        return 0
    return stop.agreed(device, world)


def preempted(signum: int, state: TrainState, run: RunDirectory) -> Preempted:
    """The exception that ends a run stopped by a signal, once its resume point is saved."""
    return Preempted(
        signum,
        f"stopped by {signal_name(signum)} in epoch {state.epoch + 1}, after step {state.step}; "
        f"{run.path / 'checkpoints' / 'last'} holds the position: add --resume to the same "
        "command to continue",
    )


def read_back_due(step: int, pending: DeviceSums, world: distributed.World) -> bool:
    """Whether the metrics are read back after `step`, to show progress and check the loss.

    Several ranks must meet at the same steps to sum their losses, so they read back on a step
    count; one process reads back on the clock.
    """
    if world.size > 1:
        return step % SYNC_STEPS == 0
    return time.perf_counter() - pending.read_at > SYNC_SECONDS


def check_mapped_files(run: RunDirectory, device: torch.device, state: TrainState) -> None:
    """Stop the run, on every rank together, when a memory-mapped input changed in place."""
    changed = run.mapped.changed() if run.mapped is not None else None
    anywhere = distributed.all_reduce_sum(torch.tensor([float(changed is not None)], device=device))
    if anywhere.item() == 0:
        return
    last = run.path / "checkpoints" / "last"
    raise ClipcapError(
        f"{changed or 'a memory-mapped input'} changed while training read it (epoch "
        f"{state.epoch + 1}, step {state.step}): do not write to a feature cache or its token "
        "file during training (replace it by a rename instead); put it back as it was and add "
        f"--resume to continue from {last}"
    )


def read_back(
    pending: DeviceSums, state: TrainState, objective: Objective, run: RunDirectory, batch: int
) -> None:
    """Sum the pending metrics over the ranks into `state`, up to `batch` (exclusive).

    Raises ClipcapError when the loss is no longer finite, saying which checkpoint is kept. Every
    save is preceded by a read-back, so a non-finite loss never reaches a checkpoint.
    """
    check_mapped_files(run, pending.totals.device, state)
    values = distributed.all_reduce_sum(pending.totals).tolist()
    value = values[0]
    if not math.isfinite(value):
        last = run.path / "checkpoints" / "last"
        kept = (
            f"The last good checkpoint is kept in {last}"
            if last.exists()
            else "No checkpoint had been saved yet"
        )
        raise ClipcapError(
            f"the loss became {value} in epoch {state.epoch + 1}, batches "
            f"{pending.first_batch + 1}-{batch}; stopping. {kept}. Try a lower --lr or "
            "--precision fp32"
        )
    state.loss_sum += value
    for name, total in zip(objective.metrics[1:], values[1:], strict=True):
        state.sums[name] = state.sums.get(name, 0.0) + total
    pending.totals.zero_()
    pending.first_batch, pending.read_at = batch, time.perf_counter()


def report_step(state: TrainState, optimization: Optimization, trackers: Trackers) -> None:
    """Report the step's learning rate and the mean loss (and rewards) since the last report.

    The means cover the steps since the last reported one, or since the epoch's start, weighted
    as the epoch's are (tokens, or images under scst); the learning rate is the step's own.
    Called once the step's metrics are read back and before the optimizer steps.
    """
    done = {"loss": state.loss_sum, "weight": state.weight_sum, **state.sums}
    weight = max(done["weight"] - state.reported.get("weight", 0), 1)
    values = {
        name: (total - state.reported.get(name, 0.0)) / weight
        for name, total in done.items()
        if name != "weight"
    }
    values["lr"] = optimization.scheduler.get_last_lr()[0]
    state.reported = done
    log.debug("step %d: %s", state.step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
    trackers.log_metrics({f"train/{name}": value for name, value in values.items()}, state.step)


def progress_postfix(state: TrainState, objective: Objective, seconds: float) -> dict[str, str]:
    """What the progress bar shows: the epoch's mean loss (and reward), and samples per second."""
    shown = {"loss": f"{state.loss_sum / state.weight_sum:.3f}"}
    if "reward" in state.sums:
        shown["reward"] = f"{state.sums['reward'] / state.weight_sum:.3f}"
    rate = state.samples_done / max(seconds, 1e-9)
    shown["img_s" if objective.unit == "image" else "cap_s"] = f"{rate:.1f}"
    return shown


def epoch_row(
    state: TrainState, objective: Objective, optimization: Optimization, seconds: float
) -> dict:
    """The epoch's metrics row: its weighted mean loss and metrics, learning rate and speed."""
    return {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": state.loss_sum / max(state.weight_sum, 1),
        **{name: total / max(state.weight_sum, 1) for name, total in state.sums.items()},
        "lr": optimization.scheduler.get_last_lr()[0],
        "seconds": round(seconds, 3),
        f"{objective.unit}s_per_second": round(state.samples_done / max(seconds, 1e-9), 2),
    }
