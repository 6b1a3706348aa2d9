"""Length-grouped batches against random ones: captions/s and the loss curve, batch 40.

    python benchmarks/group_by_length.py [--images 80] [--epochs 1] [--device cpu]

A synthetic cache whose captions follow the length distribution of COCO's (see `coco_lengths`),
and GPT-2 124M built from its config with random weights (the default 6 of 12 blocks frozen, MLP
projector). Two copies of the same initial model are trained on the same captions, one in the
order `clipcap train --no-group-by-length` takes (the plain shuffle), one in the
`--group-by-length` order, with the step functions of `clipcap train`
(`objectives.CrossEntropy.forward_backward`, `optimization.Optimization.step`). Their steps
alternate, so a load that changes during the run (a shared machine) slows both alike. A third
copy trained in a plain shuffle of another seed shows how far two runs differ by chance alone
(`--no-noise-run` skips it). Reports the padding share, captions/s, the loss of every step and
the loss of each model on held-out captions at the end.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import WORDS, build_gpt2_124m, save_result

from clipcap_cache.data.cache import open_cache, write_cache
from clipcap_cache.model import ModelConfig, build_model, load_tokenizer
from clipcap_cache.training.batches import epoch_order, sample_lengths
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.data import caption_data
from clipcap_cache.training.objectives import CrossEntropy
from clipcap_cache.training.optimization import make_optimization


def coco_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Caption lengths in words, an assumption modelled on COCO Captions.

    What is known: COCO's annotators had to write at least 8 words (Chen et al., 2015,
    arXiv:1504.00325); the mean is commonly reported as about 10.5 words; neuraltalk2's
    preprocessing of the Karpathy split cuts captions at 16 words, a limit chosen to keep nearly
    all of them whole; a few run to 40 words and more. No published histogram was at hand, so the
    shape is assumed: 8 words plus a gamma-distributed excess (mean 2.5, a long right tail), and 1%
    of captions of 16 to 45 words for the far tail. The benchmark's tokenizer spends one token a
    word, so a caption is its words plus EOS, about 11.5 tokens; GPT-2's own BPE spends a little
    more than a token a word on COCO's plain English (an estimate, not measured here), so real
    captions are slightly longer, with the same spread.
    """
    rng = np.random.default_rng(seed)
    words = 8 + np.round(rng.gamma(1.2, 2.1, n)).astype(int)
    tail = rng.random(n) < 0.01
    words[tail] = rng.integers(16, 46, tail.sum())
    return words


def write_cache_with_lengths(path: Path, images: int, val_images: int) -> None:
    """A cache of random embeddings and 5 captions per image with COCO's caption lengths."""
    total = images + val_images
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, w)) for w in coco_lengths(total * 5)]
    write_cache(
        path,
        embeddings=rng.standard_normal((total, 512)).astype(np.float16),
        image_ids=[str(i) for i in range(total)],
        image_paths=[f"{i}.jpg" for i in range(total)],
        splits=["train"] * images + ["val"] * val_images,
        captions=captions,
        caption_image_index=np.repeat(np.arange(total), 5),
        failed_paths=[],
        failed_reasons=[],
        attrs={"clip_model": "synthetic", "embedding_dim": 512, "complete": True},
    )


def padding_share(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> float:
    """Share of the padded (B, T) batches of an order that is padding."""
    padded = sum(
        lengths[order[i : i + batch_size]].max() * len(order[i : i + batch_size])
        for i in range(0, len(order), batch_size)
    )
    return round(1 - lengths.sum() / padded, 4)


class Run:
    """One model trained in one order, one batch at a time."""

    def __init__(self, gpt2_dir, config, objective, order, device, steps):
        torch.manual_seed(0)  # the same initial model in every run
        self.model = build_model(ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=512)).to(
            device
        )
        self.model.train()
        self.optimization = make_optimization(self.model, config, device, steps)
        self.objective, self.order, self.config = objective, order, config
        self.seconds, self.captions, self.losses = 0.0, 0, []

    def step(self, epoch: int, b: int) -> None:
        size = self.config.batch_size
        samples = self.order[epoch][b * size : (b + 1) * size]
        start = time.perf_counter()
        loss = self.objective.forward_backward(
            self.model, self.model, samples, 1.0, self.optimization.scaler, None, epoch
        )
        self.losses.append(round(loss.item(), 4))  # the sync a step ends with on the CPU
        self.optimization.step()
        self.seconds += time.perf_counter() - start
        self.captions += len(samples)

    @torch.no_grad()
    def held_out_loss(self, data, pad_id) -> float:
        """Mean loss per token over held-out captions, in batches of 50."""
        self.model.eval()
        total = tokens = 0
        device = next(self.model.parameters()).device
        for start in range(0, len(data), 50):
            samples = np.arange(start, min(start + 50, len(data)))
            embeddings, input_ids, labels = (t.to(device) for t in data.batch(samples, pad_id))
            n = data.count_tokens(samples)
            total += self.model(embeddings, input_ids, labels).item() * n
            tokens += n
        return round(total / tokens, 4)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--val-images", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--noise-run", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--work", type=Path, default=None, help="keep the models here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    gpt2_dir = build_gpt2_124m(work / "gpt2")
    features = work / f"lengths-{args.images}-{args.val_images}.h5"
    if not features.exists():
        write_cache_with_lengths(features, args.images, args.val_images)
    device = torch.device(args.device)
    tokenizer = load_tokenizer(str(gpt2_dir))
    cache = open_cache(features)
    data, _ = caption_data(cache, cache.rows_of_split("train"), tokenizer, 40)
    val, _ = caption_data(cache, cache.rows_of_split("val"), tokenizer, 40)
    pad_id = tokenizer.eos_token_id
    objective = CrossEntropy(data, pad_id)
    lengths = sample_lengths(objective)
    config = TrainConfig(
        features=str(features), out="", batch_size=args.batch_size, lr=1e-4, warmup_steps=5
    )
    batches = -(-len(data) // args.batch_size)
    plans = {"random": (False, config.seed), "grouped": (True, config.seed)}
    if args.noise_run:
        plans["random_other_seed"] = (False, config.seed + 1)
    runs = {}
    for name, (group, seed) in plans.items():
        order = [epoch_order(lengths, args.batch_size, seed, e, group) for e in range(args.epochs)]
        runs[name] = Run(gpt2_dir, config, objective, order, device, batches * args.epochs)
    for epoch in range(args.epochs):
        for b in range(batches):
            for run in runs.values():  # interleaved: each step of each run meets the same load
                run.step(epoch, b)
    results = {}
    for name, run in runs.items():
        results[name] = {
            "padding_share": padding_share(run.order[0], lengths, args.batch_size),
            "captions_per_s": round(run.captions / run.seconds, 3),
            "step_losses": run.losses,
            "held_out_loss": run.held_out_loss(val, pad_id),
        }
    speedup = results["grouped"]["captions_per_s"] / results["random"]["captions_per_s"]
    save_result(
        "group_by_length",
        {
            "device": args.device,
            "captions": len(data),
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "tokens_mean": round(float(lengths.mean()), 2),
            "tokens_p50_p90_p99_max": [int(np.percentile(lengths, q)) for q in (50, 90, 99, 100)],
            **results,
            "speedup": round(speedup, 3),
        },
    )


if __name__ == "__main__":
    main()
