"""Training objectives: the `Objective` interface, and `CrossEntropy` (`--objective xe`).

`loop.train_one_epoch` runs any `Objective`. `CrossEntropy` is teacher-forced captions; the
other objective, `scst.SelfCritical` (`--objective scst`), lives with the rest of self-critical
training in `scst.py`.
"""

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from clipcap_cache import devices
from clipcap_cache.model import ClipCaptionModel
from clipcap_cache.training.data import CaptionData


class Objective(Protocol):
    """What `loop.train_one_epoch` needs of a training objective.

    An epoch is a shuffled pass over the objective's samples, numbered 0 to `len(objective) - 1`.
    Each sample has a weight (`count`); the epoch's metrics are means weighted by it, and the
    micro-batches of an optimizer step are weighted by their share of it, so that accumulated
    gradients equal those of one large batch.
    """

    unit: ClassVar[str]  # what a sample is ("caption", "image"): names the `{unit}s_per_second` key

    @property
    def metrics(self) -> tuple[str, ...]:
        """The names of what `forward_backward` returns, in order, `loss` first; row keys."""
        ...

    def __len__(self) -> int:
        """The number of samples in an epoch."""
        ...

    def count(self, samples: np.ndarray) -> int:
        """The summed weight of some samples: labelled tokens (xe) or images (scst)."""
        ...

    def forward_backward(
        self,
        model: ClipCaptionModel,
        train_module,
        samples: np.ndarray,
        weight: float,
        scaler: torch.amp.GradScaler,
        amp_dtype: torch.dtype | None,
        epoch: int,
    ) -> torch.Tensor:
        """Back-propagate the loss of some samples, its gradient scaled by `weight`.

        `train_module` is `model` or its DDP or compiled form, and `scaler` the AMP grad scaler that
        scales the loss before `backward`. Returns the detached means over the samples of each of
        `metrics`, a (len(metrics),) tensor on the model's device.
        """
        ...


@dataclass
class CrossEntropy:
    """`--objective xe`, teacher-forced captions: a sample is a caption, weighted by its tokens.

    An `Objective`.
    """

    data: CaptionData
    pad_id: int
    # The standard deviation of Gaussian noise added to each input embedding (`--noise-variance`,
    # CapDec), drawn from torch's seeded generator, whose state a resume restores.
    noise_std: float = 0.0
    unit: ClassVar[str] = "caption"
    metrics: ClassVar[tuple[str, ...]] = ("loss",)

    def __len__(self) -> int:
        return len(self.data)

    def count(self, samples: np.ndarray) -> int:
        """Labelled tokens (caption tokens and EOS) of some captions."""
        return self.data.count_tokens(samples)

    def forward_backward(
        self,
        model: ClipCaptionModel,
        train_module,
        samples: np.ndarray,
        weight: float,
        scaler: torch.amp.GradScaler,
        amp_dtype: torch.dtype | None,
        epoch: int,
    ) -> torch.Tensor:
        """Back-propagate some captions; returns their mean loss per token (1,), on the device."""
        device = next(model.parameters()).device
        embeddings, input_ids, labels = self.data.batch(samples, self.pad_id)
        noise = torch.randn(embeddings.shape) * self.noise_std if self.noise_std else None
        loss = forward_backward(
            train_module,
            embeddings.to(device),
            input_ids.to(device),
            labels.to(device),
            weight,
            scaler,
            amp_dtype,
            noise.to(device) if noise is not None else None,
        )
        return loss.reshape(1)


def forward_backward(
    train_module,
    embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One micro-batch: the loss under autocast, and its gradient scaled by `weight`.

    `noise` (B, D) is added to the embeddings after their normalisation (`--noise-variance`).
    Returns the detached mean loss per token, still on the device.
    """
    device = embeddings.device
    with devices.autocast(device, amp_dtype):
        loss = train_module(embeddings, input_ids, labels, noise)
    scaler.scale(loss * weight).backward()
    return loss.detach().float()
