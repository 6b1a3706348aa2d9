"""How far a run has got, saved in `train_state.pt` so that `--resume` continues where it stopped.

`TrainState` holds the counters (epoch, position in the epoch, steps, the sums the epoch's
metrics are averaged from). `capture_rng` and `restore_rng` save and restore the random number
generators of every rank, so that a resumed run draws what an uninterrupted one would have drawn.
"""

from dataclasses import asdict, dataclass, field, fields

import torch

from clipcap_cache import distributed

# Keys of a train state saved before the counters were renamed, and their names now.
_OLD_NAMES = {"captions": "samples_done", "tokens": "weight_sum"}


@dataclass
class TrainState:
    """How far a run has got; saved in `train_state.pt`, so `--resume` continues where it stopped."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps so far
    loss_sum: float = 0.0  # the current epoch's weighted loss sum, as read back from the device
    # The current epoch's summed sample weights, which the loss is averaged over: labelled tokens
    # (xe) or images (scst); `Objective.count`.
    weight_sum: int = 0
    samples_done: int = 0  # the current epoch's samples done (captions, or images under scst)
    seconds: float = 0.0  # the current epoch's training time up to the last save
    best: float | None = None  # the best value of the selection criterion (`selection`) so far
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    sums: dict[str, float] = field(default_factory=dict)  # scst: summed rewards and lengths
    # The epoch's sums at its last reported step ("loss", "weight" and `sums`' keys), so the
    # next report is the mean since then (`loop.report_step`), a resumed run's too.
    reported: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Take the counters of a saved state; older key names are read under their new ones."""
        state = {_OLD_NAMES.get(key, key): value for key, value in state.items()}
        # A field that a run saved by an older version lacks keeps its default.
        for field_ in fields(self):
            if field_.name in state:
                setattr(self, field_.name, state[field_.name])

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrainState":
        """The state a saved `train_state.pt` (or its dict) holds."""
        train_state = cls()
        train_state.load_state_dict(state)
        return train_state

    def finish_epoch(self, row: dict) -> None:
        """Record a completed epoch's metrics and reset the per-epoch counters."""
        self.epoch += 1
        self.batch, self.loss_sum, self.weight_sum, self.samples_done = 0, 0.0, 0, 0
        self.seconds = 0.0
        self.sums, self.reported = {}, {}
        self.history = [*self.history, row]


def capture_rng(device: torch.device) -> dict:
    """The random number generators' states, this process's and every rank's, for `train_state.pt`.

    Every rank must call this (the states are gathered); each gets the same dict.
    """
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    rng_per_rank = distributed.all_gather_objects((torch.get_rng_state(), cuda_rng))
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "world_size": len(rng_per_rank),
        "torch_rng_per_rank": [cpu for cpu, _ in rng_per_rank],
        "cuda_rng_per_rank": [gpu for _, gpu in rng_per_rank if gpu is not None],
    }


def restore_rng(state: dict, device: torch.device, world: distributed.World) -> None:
    """Set this rank's random number generators to the states `capture_rng` saved in `state`."""
    if world.size > 1:
        torch.set_rng_state(state["torch_rng_per_rank"][world.rank])
        if device.type == "cuda" and state.get("cuda_rng_per_rank"):
            torch.cuda.set_rng_state(state["cuda_rng_per_rank"][world.rank], device)
    else:
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
