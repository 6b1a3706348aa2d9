"""Self-critical sequence training (SCST): sampling, rewards, the advantage and the loss.

    clipcap train data/coco_vitb32.h5 --out runs/coco-scst --init runs/coco --objective scst

For each image, K captions are sampled and each gets a reward: CIDEr-D against the image's
references (`cider.CiderD`, document frequencies from the training split), CLIP-S with the cached
image embedding (`clipscore.clip_s`), or a weighted sum of both. A sample's advantage is its
reward minus a baseline:

- `mean`: the mean reward of the image's other K - 1 samples (Luo, 2020, "A Better Variant of
  Self-Critical Sequence Training"); needs K >= 2;
- `greedy`: the reward of the image's greedy caption (Rennie et al., 2017, "Self-critical
  Sequence Training for Image Captioning").

The loss is -(advantage) x (the sum of the sample's token log-probabilities, its EOS included),
from one teacher-forced pass over the sampled sequences, padding after EOS masked out, averaged
over the samples. That pass runs with dropout off, as the sampling does: the policy that is
trained is the one that sampled. `SelfCritical` is the training objective that
`loop.train_one_epoch` runs with `--objective scst`; a sample of the epoch is an image.

Sampling is transformers' `generate()` with the Gumbel-max trick: `GumbelNoise` adds Gumbel noise
to the log-probabilities and the search takes the argmax, which draws each token from the
model's distribution. The noise is a hash of (seed, epoch, image, sample, step, token), not a
draw from torch's generator, so an image's samples are the same whichever process and batch
position it has: two processes under torchrun train like one, and a resumed run like one that
was never stopped.
"""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from clipcap_cache import devices
from clipcap_cache.errors import ClipcapError
from clipcap_cache.evaluation.cider import CiderD
from clipcap_cache.evaluation.clipscore import ClipText, clip_s
from clipcap_cache.inference.generate import clean_caption, counted_tokens
from clipcap_cache.model import ClipCaptionModel, eval_mode, pad_token_id

BASELINES = ("mean", "greedy")
REWARD_TERMS = {"cider": ("cider",), "clip": ("clip",), "cider+clip": ("cider", "clip")}
REWARDS = tuple(REWARD_TERMS)
_MASK = 0xFFFFFFFF


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
    train_module,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    advantage: torch.Tensor,
    eos: int,
) -> torch.Tensor:
    """The self-critical loss of sampled sequences.

    `train_module` is the caption model (or its DDP or compiled wrapper): called without labels it
    gives token log-probabilities. `embeddings` (N, D) are the CLIP embeddings of each sample's
    image, `tokens` (N, T) the sampled tokens (anything after the first EOS is ignored) and
    `advantage` (N,) their advantages.

    The log-probabilities are those of the policy that drew the samples: `sample_tokens` decodes
    in eval mode, so this pass runs in eval mode too (no dropout), with gradients. With dropout
    on, the trained policy would be another, randomly thinned model than the one that sampled,
    and the update would not follow the rewards' gradient: measured on the pretrained testbed,
    SCST then lowered the greedy test CIDEr-D instead of raising it.
    """
    with eval_mode(train_module):
        log_probs = train_module(embeddings, tokens)  # (N, T)
    sequence = (log_probs * counted_tokens(tokens, eos)).sum(1)  # (N,)
    return -(advantage.detach().to(sequence.dtype) * sequence).mean()


# Sampling ---------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for int64 x in [0, 2^32), without overflowing int64."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the `lowbias32` mixer), elementwise on int64 in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seed: int, epoch: int, rows: torch.Tensor, samples: int) -> torch.Tensor:
    """One key (B * K,) per sample: image row r's k-th sample is at position r * K + k."""
    base = _mix32(torch.tensor(seed & _MASK, dtype=torch.int64))
    base = _mix32(base ^ (epoch & _MASK))
    per_image = _mix32(base ^ (rows.to(torch.int64) & _MASK))  # (B,)
    k = torch.arange(samples, dtype=torch.int64)
    return _mix32(per_image[:, None] ^ _mul32(k + 1, 0x9E3779B1)).flatten()


class GumbelNoise(LogitsProcessor):
    """Turn greedy search into sampling: log-softmax plus Gumbel noise keyed per sample and step.

    argmax(log p + g), with g ~ Gumbel(0, 1) independent per token, is a draw from p. Each
    row's noise at step t is a hash of (key, t, token id), so it does not depend on the batch.
    """

    def __init__(self, keys: torch.Tensor, temperature: float = 1.0):
        self.keys = keys  # (B,) int64 in [0, 2^32)
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1]
        keys = self.keys.to(scores.device)
        row = _mix32(keys ^ _mix32(torch.tensor(step, device=scores.device)))  # (B,)
        vocab = _mul32(torch.arange(scores.shape[1], device=scores.device), 0x85EBCA6B)
        bits = _mix32(_mix32(row[:, None] ^ vocab[None]))  # (B, V)
        uniform = (bits.double() + 0.5) / 2**32  # in (0, 1), never 0 or 1
        gumbel = -torch.log(-torch.log(uniform))
        log_probs = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return (log_probs.double() + gumbel).float()  # float32: half precision would tie


@torch.no_grad()
def sample_tokens(
    model: ClipCaptionModel,
    clip_embeddings: torch.Tensor,
    keys: torch.Tensor | None,
    samples: int,
    max_tokens: int,
    eos: int,
    pad: int,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Tokens (B * K, T) of K sampled captions per (D,) embedding; with `keys` None, greedy (K=1).

    The model decodes in eval mode (no dropout), as it will caption; its mode is restored.
    """
    device = clip_embeddings.device
    config = GenerationConfig(
        do_sample=False,  # GumbelNoise makes the argmax a sample
        num_beams=1,
        max_new_tokens=max_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    processors = LogitsProcessorList([GumbelNoise(keys)] if keys is not None else [])
    with eval_mode(model), devices.autocast(device, amp_dtype):
        prefix = model.prefix_embeddings(clip_embeddings)  # (B, P, H)
        prefix = prefix.repeat_interleave(samples, dim=0)  # (B * K, P, H): one row per sample
        tokens = model.gpt2.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=device),
            generation_config=config,
            logits_processor=processors,
        )
    return tokens


def caption_lengths(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Tokens (N,) of each generated caption, its EOS not counted."""
    counted = counted_tokens(tokens, eos)
    ended = (tokens == eos).any(1)
    return counted.sum(1) - ended.long()


# Rewards ----------------------------------------------------------------------------------------


@dataclass
class Reward:
    """The reward of a caption: CIDEr-D, CLIP-S, or their weighted sum."""

    kind: str  # cider | clip | cider+clip
    cider: CiderD | None = None  # document frequencies of the training split's references
    clip_text: ClipText | None = None  # the cache's CLIP text tower
    cider_weight: float = 1.0
    clip_weight: float = 1.0

    @property
    def parts(self) -> tuple[str, ...]:
        """Names of the reward's terms, as logged (`reward_cider`, `reward_clip`)."""
        return REWARD_TERMS[self.kind]

    def __call__(
        self, captions: list[str], references: list[list[str]], images: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Each term (N,) for N captions, their references and (N, D) image embeddings, and `total`."""
        terms = {}
        if "cider" in self.parts:
            terms["cider"] = torch.from_numpy(self.cider.score(captions, references)).float()
        if "clip" in self.parts:
            terms["clip"] = clip_s(self.clip_text, images.float().cpu(), captions)
        if self.kind == "cider+clip":
            total = self.cider_weight * terms["cider"] + self.clip_weight * terms["clip"]
        else:
            total = terms[self.kind]
        return {"total": total, **terms}


# The training objective -------------------------------------------------------------------------


@dataclass
class SelfCritical:
    """`--objective scst` for `loop.train_one_epoch`: a sample is an image, with K captions drawn.

    An `objectives.Objective`. A micro-batch of images is sampled, rewarded and scored against the
    baseline in `forward_backward`; its loss is the mean over its B x K samples, so a sample's
    `count` is 1 image (every image has the same K).
    """

    embeddings: np.ndarray  # (N, D) every row of the cache (memory-mapped)
    rows: np.ndarray  # (I,) the cache rows of the training images
    references: list[list[str]]  # (I,) each training image's reference captions
    reward: Reward
    tokenizer: object
    samples: int  # K
    baseline: str  # mean | greedy
    max_tokens: int
    seed: int
    unit: ClassVar[str] = "image"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def metrics(self) -> tuple[str, ...]:
        """What a micro-batch reports, each a mean over its samples (row keys of the epoch)."""
        extra = (
            tuple(f"reward_{p}" for p in self.reward.parts)
            if self.reward.kind == "cider+clip"
            else ()
        )
        return ("loss", "reward", *extra, "sample_length")

    def count(self, samples: np.ndarray) -> int:
        """Images: every image weighs the same, as each has K samples."""
        return len(samples)

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
        """Sample, reward and back-propagate some images; returns their means (len(metrics),)."""
        device = next(model.parameters()).device
        eos = self.tokenizer.eos_token_id
        pad = pad_token_id(self.tokenizer)
        rows = self.rows[samples]
        embeddings = torch.from_numpy(np.asarray(self.embeddings[rows])).float().to(device)
        references = [self.references[i] for i in samples]
        k = self.samples
        keys = sample_keys(self.seed, epoch, torch.from_numpy(rows), k)
        tokens = sample_tokens(
            model, embeddings, keys, k, self.max_tokens, eos, pad, amp_dtype
        )  # (B * K, T)
        repeated = [refs for refs in references for _ in range(k)]
        images = embeddings.repeat_interleave(k, dim=0)  # (B * K, D)
        rewards = self.reward(self._texts(tokens), repeated, images)
        greedy_rewards = None
        if self.baseline == "greedy":
            greedy = sample_tokens(model, embeddings, None, 1, self.max_tokens, eos, pad, amp_dtype)
            greedy_rewards = self.reward(self._texts(greedy), references, embeddings)["total"]
        advantage = advantages(rewards["total"].view(-1, k), self.baseline, greedy_rewards)
        with devices.autocast(device, amp_dtype):
            loss = scst_loss(train_module, images, tokens, advantage.flatten().to(device), eos)
        scaler.scale(loss * weight).backward()
        lengths = caption_lengths(tokens, eos).float()
        means = [rewards["total"].mean()]
        if self.reward.kind == "cider+clip":
            means += [rewards[p].mean() for p in self.reward.parts]
        means.append(lengths.mean().cpu())
        return torch.stack([loss.detach().float().cpu(), *means]).to(device)

    def _texts(self, tokens: torch.Tensor) -> list[str]:
        return [
            clean_caption(t) for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        ]
