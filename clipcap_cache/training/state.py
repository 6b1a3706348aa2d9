"""`TrainState`: how far a run has got, saved in `train_state.pt` so that `--resume` continues."""

from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    """How far a run has got; saved in `train_state.pt`, so `--resume` continues where it stopped."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps so far
    loss_sum: float = 0.0  # the current epoch's summed loss, as read back from the device
    tokens: int = 0  # what the loss is averaged over: labelled tokens (xe) or images (scst)
    captions: int = 0  # the current epoch's samples done (captions, or images under scst)
    seconds: float = 0.0  # the current epoch's training time up to the last save
    best: float | None = None  # the best value of the selection criterion (`selection`) so far
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    sums: dict[str, float] = field(default_factory=dict)  # scst: summed rewards and lengths

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # A field that a run saved by an older version lacks keeps its default.
        for field_ in fields(self):
            if field_.name in state:
                setattr(self, field_.name, state[field_.name])

    def finish_epoch(self, row: dict) -> None:
        """Record a completed epoch's metrics and reset the per-epoch counters."""
        self.epoch += 1
        self.batch, self.loss_sum, self.tokens, self.captions, self.seconds = 0, 0.0, 0, 0, 0.0
        self.sums = {}
        self.history = [*self.history, row]
