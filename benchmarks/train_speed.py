"""Training epoch time: from the feature cache against the on-the-fly design it replaces.

    python benchmarks/train_speed.py [--images 32] [--batch-size 40]

Same samples (every caption of every image), same model (ViT-B/32 + GPT-2 124M, random weights),
same batches, and the same step functions as `clipcap train`: `objectives.forward_backward` for the
micro-batch and `optimization.Optimization.step` (fused AdamW, clipping, schedule). The
on-the-fly design decodes the JPEG and runs CLIP in each sample's __getitem__, as the seed
implementation does; the cached design reads the memory-mapped embeddings and tokens (`data.CaptionData`).
Also reports the share of step time spent outside the model's forward and backward passes.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import coco_cache, save_result

from clipcap_cache.data.cache import open_cache, read_cache
from clipcap_cache.data.images import load_image
from clipcap_cache.extraction.encoder import load_clip
from clipcap_cache.model import ModelConfig, build_model, load_tokenizer
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.data import caption_data
from clipcap_cache.training.objectives import forward_backward
from clipcap_cache.training.optimization import make_optimization


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    clip_dir, gpt2_dir, features = coco_cache(work, args.images)
    cache = open_cache(features)
    tokenizer = load_tokenizer(str(gpt2_dir))
    data, _ = caption_data(cache, cache.rows_of_split("all"), tokenizer, 40)
    image_paths = read_cache(features).image_paths
    torch.manual_seed(0)
    model = build_model(ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=512)).train()
    encoder = load_clip(str(clip_dir), "cpu")
    order = np.random.default_rng(0).permutation(len(data))
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    pad = tokenizer.eos_token_id
    config = TrainConfig(features="", out="", batch_size=args.batch_size)
    optimization = make_optimization(model, config, torch.device("cpu"), 3 * len(batches))

    def step(embeddings, input_ids, labels, timings):
        start = time.perf_counter()
        loss = forward_backward(
            model, embeddings, input_ids, labels, 1.0, optimization.scaler, None
        )
        middle = time.perf_counter()
        loss.item()  # as training does before a save; on the CPU every step syncs anyway
        optimization.step()
        timings["model"] += middle - start
        timings["optimizer"] += time.perf_counter() - middle

    def cached_epoch():
        timings = {"model": 0.0, "optimizer": 0.0, "data": 0.0}
        start = time.perf_counter()
        for samples in batches:
            data_start = time.perf_counter()
            batch = data.batch(samples, pad)
            timings["data"] += time.perf_counter() - data_start
            step(*batch, timings)
        return time.perf_counter() - start, timings

    def on_the_fly_epoch():
        timings = {"model": 0.0, "optimizer": 0.0}
        start = time.perf_counter()
        for samples in batches:
            rows = data.caption_rows[data.captions[samples]]
            # Each sample decodes its image and runs CLIP, once per caption.
            pixels = [
                encoder.processor(
                    images=load_image(work / "images" / image_paths[r]), return_tensors="pt"
                )["pixel_values"]
                for r in rows
            ]
            embeddings = torch.cat([encoder.encode(p) for p in pixels])
            _, input_ids, labels = data.batch(samples, pad)
            step(embeddings, input_ids, labels, timings)
        return time.perf_counter() - start, timings

    cached_epoch()  # warm-up
    cached_seconds, timings = cached_epoch()
    fly_seconds, _ = on_the_fly_epoch()
    shutil.rmtree(work)
    captions = len(data)
    save_result(
        "train_speed",
        {
            "images": args.images,
            "captions": captions,
            "batch_size": args.batch_size,
            "freeze_layers": model.config.freeze_layers,
            "cached_epoch_s": round(cached_seconds, 2),
            "on_the_fly_epoch_s": round(fly_seconds, 2),
            "cached_captions_per_s": round(captions / cached_seconds, 2),
            "on_the_fly_captions_per_s": round(captions / fly_seconds, 2),
            "speedup": round(fly_seconds / cached_seconds, 2),
            "share_outside_forward_backward": round(1 - timings["model"] / cached_seconds, 4),
            "share_optimizer_step": round(timings["optimizer"] / cached_seconds, 4),
            "share_batch_assembly": round(timings["data"] / cached_seconds, 4),
        },
    )


if __name__ == "__main__":
    main()
