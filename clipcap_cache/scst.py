"""Self-critical sequence training (SCST): the advantage and the loss.

For each image, K captions are sampled and each gets a reward, CIDEr-D against the image's
references (`cider.CiderD`). A sample's advantage is its reward minus a baseline:

- `mean`: the mean reward of the image's other K - 1 samples (Luo, 2020, "A Better Variant of
  Self-Critical Sequence Training"); needs K >= 2;
- `greedy`: the reward of the image's greedy caption (Rennie et al., 2017, "Self-critical
  Sequence Training for Image Captioning").

The loss is -(advantage) x (the sum of the sample's token log-probabilities), from one
teacher-forced pass over the sampled sequences, padding after EOS masked out, averaged over the
samples. The trainer's `--objective scst` is built from these (not yet wired in).
"""

import torch

from clipcap_cache.errors import ClipcapError
from clipcap_cache.generate import token_log_probs
from clipcap_cache.model import ClipCaptionModel

BASELINES = ("mean", "greedy")


def advantages(
    rewards: torch.Tensor, baseline: str = "mean", greedy_rewards: torch.Tensor | None = None
) -> torch.Tensor:
    """Reward minus baseline for (B, K) rewards of K samples per image."""
    if baseline == "mean":
        k = rewards.shape[1]
        if k < 2:
            raise ClipcapError("--baseline mean needs --samples 2 or more")
        others = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
        return rewards - others
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("the greedy baseline needs the greedy captions' rewards")
        return rewards - greedy_rewards[:, None]
    raise ClipcapError(f"--baseline must be one of {', '.join(BASELINES)}, not {baseline!r}")


def scst_loss(
    model: ClipCaptionModel,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    advantage: torch.Tensor,
    eos: int,
) -> torch.Tensor:
    """The self-critical loss of sampled sequences.

    `embeddings` (N, D) are the CLIP embeddings of each sample's image, `tokens` (N, T) the sampled
    tokens (anything after the first EOS is ignored) and `advantage` (N,) their advantages.
    """
    prefix = model.prefix_embeddings(embeddings)
    log_probs, counted = token_log_probs(model, prefix, tokens, eos)
    sequence = (log_probs * counted).sum(1)  # (N,)
    return -(advantage.detach().to(sequence.dtype) * sequence).mean()
