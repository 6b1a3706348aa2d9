"""The optimizer step: AdamW, warmup then linear decay, and the AMP grad scaler."""

from dataclasses import dataclass

import torch

from clipcap_cache.model import ClipCaptionModel
from clipcap_cache.training.config import TrainConfig


@dataclass
class Optimization:
    """What an optimizer step needs: AdamW, its learning-rate schedule and the AMP grad scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    max_grad_norm: float

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
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def make_optimization(
    model: ClipCaptionModel,
    config: TrainConfig,
    device: torch.device,
    total_steps: int,
    amp_dtype: torch.dtype | None = None,
) -> Optimization:
    """AdamW over the trainable parameters, warmup then linear decay, and a grad scaler for fp16.

    AdamW is fused into a few kernels per step where torch has that (CPU, CUDA, MPS).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda", "mps"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_decay(config.warmup_steps, total_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Optimization(optimizer, scheduler, scaler, params, config.max_grad_norm)


def warmup_then_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor
