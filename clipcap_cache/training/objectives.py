"""Training objectives. `CrossEntropy` (`--objective xe`) is teacher-forced captions."""

from dataclasses import dataclass

import numpy as np
import torch

from clipcap_cache import devices
from clipcap_cache.model import ClipCaptionModel
from clipcap_cache.training.data import CaptionData


@dataclass
class CrossEntropy:
    """`--objective xe`, teacher-forced captions: a sample is a caption, weighted by its tokens."""

    data: CaptionData
    pad_id: int
    unit = "caption"
    metrics = ("loss",)

    def __len__(self) -> int:
        return len(self.data)

    def count(self, samples: np.ndarray) -> int:
        return self.data.count_tokens(samples)

    def forward_backward(
        self,
        model: ClipCaptionModel,
        forward,
        samples: np.ndarray,
        weight: float,
        scaler: torch.amp.GradScaler,
        amp_dtype: torch.dtype | None,
        epoch: int,
    ) -> torch.Tensor:
        """Back-propagate some captions; returns their mean loss per token (1,), on the device."""
        device = next(model.parameters()).device
        embeddings, input_ids, labels = self.data.batch(samples, self.pad_id)
        loss = forward_backward(
            forward,
            embeddings.to(device),
            input_ids.to(device),
            labels.to(device),
            weight,
            scaler,
            amp_dtype,
        )
        return loss.reshape(1)


def forward_backward(
    forward,
    embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """One micro-batch: the loss under autocast, and its gradient scaled by `weight`.

    Returns the detached mean loss per token, still on the device.
    """
    device = embeddings.device
    with devices.autocast(device, amp_dtype):
        loss = forward(embeddings, input_ids, labels)
    scaler.scale(loss * weight).backward()
    return loss.detach().float()
