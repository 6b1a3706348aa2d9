"""One real `clipcap train` epoch on a synthetic cache the size of Karpathy train, per precision.

    python benchmarks/train_epoch.py --device cuda [--images 113287] [--modes fp32,bf16,bf16-compile]

Writes a cache of `--images` random 512-d embeddings with 5 COCO-length captions each (Karpathy
train is 113,287 images and about 567k captions), then runs `train.train` for one epoch per mode,
with validation and mid-epoch saves off, GPT-2 124M (random weights) and the default settings
otherwise (MLP projector, 6 of 12 blocks frozen, batch 40). The epoch time is the one the run
itself records in `metrics.jsonl`, so tokenizing, model loading and the final save are not in it.

Modes: `fp32` (the baseline), `bf16` (autocast) and `bf16-compile` (autocast plus torch.compile).
AdamW is fused in all of them, as `clipcap train` does. On the CPU, pass a small `--images` to
check that the script runs; the epoch time it is written for is on a GPU.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import build_gpt2_124m, save_result, write_synthetic_cache

from clipcap_cache.model import ModelConfig
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.train import train

KARPATHY_TRAIN_IMAGES = 113_287
MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16-compile": ("bf16", True)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=KARPATHY_TRAIN_IMAGES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="fp32,bf16,bf16-compile")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")

    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    gpt2_dir = build_gpt2_124m(work / "gpt2")
    n = args.images
    captions = write_synthetic_cache(work / "features.h5", n)
    result = {"images": n, "captions": len(captions), "batch_size": args.batch_size}
    for mode in modes:
        precision, compile_ = MODES[mode]
        run_dir = work / f"run-{mode}"
        train(
            TrainConfig(
                features=str(work / "features.h5"),
                out=str(run_dir),
                epochs=1,
                batch_size=args.batch_size,
                device=args.device,
                precision=precision,
                compile=compile_,
                validate=False,
                save_every_steps=0,
            ),
            ModelConfig(gpt2_model=str(gpt2_dir)),
        )
        row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        result[mode] = {
            "epoch_s": row["seconds"],
            "captions_per_s": row["captions_per_second"],
            "karpathy_epoch_s": round(5 * KARPATHY_TRAIN_IMAGES / row["captions_per_second"], 1),
        }
        if mode != "fp32" and "fp32" in result:
            result[mode]["speedup_over_fp32"] = round(result["fp32"]["epoch_s"] / row["seconds"], 2)
        shutil.rmtree(run_dir)
    shutil.rmtree(work)
    save_result("train_epoch", result)


if __name__ == "__main__":
    main()
