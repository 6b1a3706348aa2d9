"""Self-critical (SCST) epoch time: from the feature cache against decoding and encoding images.

    python benchmarks/scst_speed.py [--images 16] [--batch-size 8] [--samples 5] [--device cuda]

Both designs run the same `scst.SelfCritical.forward_backward` that `clipcap train --objective
scst` runs (K samples per image with `generate()`, CIDEr-D rewards, the mean-of-others baseline,
one teacher-forced forward and backward pass) and the same optimizer step, on the same images in
the same batches, with ViT-B/32 + GPT-2 124M (random weights). The cached design reads the
memory-mapped embeddings. The on-the-fly design decodes each image's JPEG and runs CLIP on it in
every step, once per image (its K samples share the image), which is the least a design without
the cache must do. The reward's share of the cached step is timed inside the real step.
"""

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import coco_cache, save_result

from clipcap_cache.data.cache import open_cache, read_cache
from clipcap_cache.data.images import load_image
from clipcap_cache.evaluation.cider import CiderD
from clipcap_cache.extraction.encoder import load_clip
from clipcap_cache.model import ModelConfig, build_model, load_tokenizer
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.optimization import make_optimization
from clipcap_cache.training.scst import Reward, SelfCritical


class TimedReward:
    """A reward that adds up the time spent in it."""

    def __init__(self, reward: Reward):
        self.reward, self.seconds = reward, 0.0

    def __getattr__(self, name):
        return getattr(self.reward, name)

    def __call__(self, *args):
        start = time.perf_counter()
        result = self.reward(*args)
        self.seconds += time.perf_counter() - start
        return result


class DecodedEmbeddings:
    """Rows of CLIP embeddings made on demand: each image decoded and encoded when asked for."""

    def __init__(self, encoder, paths: list[Path]):
        self.encoder, self.paths = encoder, paths

    def __getitem__(self, rows):
        pixels = torch.cat(
            [
                self.encoder.processor(images=load_image(self.paths[r]), return_tensors="pt")[
                    "pixel_values"
                ]
                for r in rows
            ]
        )
        return self.encoder.encode(pixels).float().cpu().numpy()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=TrainConfig.samples)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    clip_dir, gpt2_dir, features = coco_cache(work, args.images)
    cache = open_cache(features)
    rows = cache.rows_of_split("all")
    references = cache.references(rows)
    paths = [work / "images" / p for p in read_cache(features).image_paths]
    tokenizer = load_tokenizer(str(gpt2_dir))
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=512))
    model = model.to(device).train()
    encoder = load_clip(str(clip_dir), device)
    reward = TimedReward(Reward("cider", CiderD(references)))
    order = np.random.default_rng(0).permutation(len(rows))
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    config = TrainConfig(features="", out="", batch_size=args.batch_size)
    optimization = make_optimization(model, config, device, 3 * len(batches))

    def epoch(embeddings, number):
        objective = SelfCritical(
            embeddings=embeddings,
            rows=rows,
            references=references,
            reward=reward,
            tokenizer=tokenizer,
            samples=args.samples,
            baseline="mean",
            max_tokens=args.max_tokens,
            seed=0,
        )
        reward.seconds = 0.0
        start = time.perf_counter()
        for samples in batches:
            objective.forward_backward(
                model, model, samples, 1.0, optimization.scaler, None, epoch=number
            )
            optimization.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # Both designs start from the same weights and optimizer state, and the same epoch number
    # draws the same samples, so they do the same work apart from where the embeddings come from.
    start_weights = {k: v.clone() for k, v in model.state_dict().items()}
    start_optimization = copy.deepcopy(optimization.state_dict())

    def restart():
        model.load_state_dict(start_weights)
        optimization.load_state_dict(copy.deepcopy(start_optimization))

    epoch(cache.embeddings, 1)  # warm-up
    restart()
    cached_seconds = epoch(cache.embeddings, 0)
    reward_seconds = reward.seconds
    restart()
    fly_seconds = epoch(DecodedEmbeddings(encoder, paths), 0)
    shutil.rmtree(work)
    save_result(
        "scst_speed",
        {
            "images": args.images,
            "batch_size": args.batch_size,
            "samples_per_image": args.samples,
            "max_tokens": args.max_tokens,
            "cached_epoch_s": round(cached_seconds, 2),
            "on_the_fly_epoch_s": round(fly_seconds, 2),
            "cached_images_per_s": round(args.images / cached_seconds, 3),
            "on_the_fly_images_per_s": round(args.images / fly_seconds, 3),
            "speedup": round(fly_seconds / cached_seconds, 2),
            "reward_s": round(reward_seconds, 3),
            "reward_share_of_step": round(reward_seconds / cached_seconds, 4),
        },
    )


if __name__ == "__main__":
    main()
