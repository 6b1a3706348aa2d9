"""The optimizer step: AdamW, its learning-rate schedule, and the AMP grad scaler.

The schedule is linear warmup, then linear decay to zero at the run's last optimizer step. Its
plan (`Schedule`) records the options it was computed from and is saved in `train_state.pt`, so a
resume keeps the decay it started with; `plan_schedule` refuses a resume whose options would
change it, or with `--replan-schedule` plans it again for the new options: the decay then
reaches zero at the run's new last step, and the run goes on from the step it has reached.
"""

import logging
import math
from dataclasses import asdict, dataclass, fields, replace

import torch

from clipcap_cache.checks import option
from clipcap_cache.errors import ClipcapError
from clipcap_cache.model import ClipCaptionModel
from clipcap_cache.training.config import TrainConfig

log = logging.getLogger(__name__)

# The options a schedule is planned from, as `Schedule` fields (the sample count is the cache's).
PLAN_INPUTS = ("epochs", "batch_size", "grad_accum", "warmup_steps", "world_size", "samples")


@dataclass(frozen=True)
class Schedule:
    """The learning-rate plan: warmup, then a linear decay that reaches zero at `total_steps`.

    `factor(step)` multiplies `--lr` for the optimizer step after `step` steps.
    """

    total_steps: int  # the run's optimizer steps, over every epoch
    warmup_steps: int
    # What the plan was computed from: the options and the samples (captions, or images under
    # scst) of an epoch. A resume whose values differ would change the plan.
    epochs: int
    batch_size: int
    grad_accum: int
    world_size: int
    samples: int

    def factor(self, step: int) -> float:
        """The learning rate's multiplier for the optimizer step after `step` steps."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def describe(self) -> str:
        """The plan's options, as flags: `--epochs 10 --batch-size 40 ...`."""
        return " ".join(
            f"{option(name)} {getattr(self, name)}"
            for name in ("epochs", "batch_size", "grad_accum", "warmup_steps")
        )


def steps_per_epoch(samples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of a whole epoch: its batches, `grad_accum` to a step (a short group last)."""
    return math.ceil(math.ceil(samples / batch_size) / grad_accum)


def plan_schedule(
    config, samples: int, world_size: int, saved: dict | None = None, progress=None
) -> Schedule:
    """The schedule of a run: a new plan, or a resumed run's own, refused if the options change it.

    Args:
        config: the run's `TrainConfig`.
        samples: samples in an epoch (captions, or captioned images under scst).
        world_size: the processes training.
        saved: the resumed run's `train_state.pt` (None for a new run). A state saved before
            schedules were recorded is planned from the current options, as runs then were.
        progress: the resumed run's `TrainState`, with `batch` counted in `config.batch_size`.

    Raises:
        ClipcapError: a resume whose options would change the saved plan, without
            `config.replan_schedule`.

    """
    per_epoch = steps_per_epoch(samples, config.batch_size, config.grad_accum)
    new = Schedule(
        total_steps=per_epoch * config.epochs,
        warmup_steps=config.warmup_steps,
        epochs=config.epochs,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        world_size=world_size,
        samples=samples,
    )
    recorded = saved.get("schedule") if saved is not None else None
    if not isinstance(recorded, dict) or set(recorded) != {f.name for f in fields(Schedule)}:
        return new  # a new run, or a state saved before schedules were recorded
    old = Schedule(**recorded)
    changed = [name for name in PLAN_INPUTS if getattr(old, name) != getattr(new, name)]
    if not changed:
        return old
    if not config.replan_schedule:
        raise ClipcapError(
            f"--resume: the run's learning-rate schedule was planned for {old.describe()} "
            f"({old.total_steps} steps); {_changes(old, new, changed)} would change it: resume "
            "with the run's values, or pass --replan-schedule to re-plan the decay from step "
            f"{progress.step}"
        )
    # The new plan ends at the run's real last step: the steps done, the rest of the current
    # epoch (a partial accumulation group counts as one, as `train_one_epoch` weights it), then
    # whole epochs.
    left = 0
    if progress.epoch < config.epochs:
        left = per_epoch - progress.batch // config.grad_accum
        left += per_epoch * (config.epochs - progress.epoch - 1)
    planned = replace(new, total_steps=progress.step + left)
    log.info(
        "--replan-schedule: %s, %d steps (was %d); the learning rate is %.3g at step %d",
        planned.describe(),
        planned.total_steps,
        old.total_steps,
        config.lr * planned.factor(progress.step),
        progress.step,
    )
    return planned


def _changes(old: Schedule, new: Schedule, changed: list[str]) -> str:
    """The changed plan inputs, in words: `--epochs 20 (was 10)`."""
    words = {
        "world_size": "processes",
        "samples": "the cache's training samples",
    }
    return ", ".join(
        f"{words.get(name, option(name))} {getattr(new, name)} (was {getattr(old, name)})"
        for name in changed
    )


@dataclass
class Optimization:
    """What an optimizer step needs: AdamW, its learning-rate schedule and the AMP grad scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    max_grad_norm: float
    schedule: Schedule

    def step(self) -> None:
        """Clip the (unscaled) gradients, update, clear the gradients and advance the schedule."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": asdict(self.schedule),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the optimizer, scheduler and scaler; the schedule comes from `plan_schedule`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def make_optimization(
    model: ClipCaptionModel,
    config: TrainConfig,
    device: torch.device,
    schedule: Schedule | int,
    amp_dtype: torch.dtype | None = None,
) -> Optimization:
    """AdamW over the trainable parameters, the schedule, and a grad scaler for fp16.

    `schedule` is the plan, or just the total steps of a plan with `config`'s warmup.

    AdamW is fused into a few kernels per step where torch has that (CPU, CUDA, MPS).
    """
    if isinstance(schedule, int):  # a plan of no run's options (benchmarks)
        schedule = Schedule(
            total_steps=schedule,
            warmup_steps=config.warmup_steps,
            epochs=0,
            batch_size=0,
            grad_accum=0,
            world_size=0,
            samples=0,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda", "mps"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        # A plain function: LambdaLR's state_dict then leaves it out, as it did before.
        optimizer,
        lambda step: schedule.factor(step),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Optimization(optimizer, scheduler, scaler, params, config.max_grad_norm, schedule)
