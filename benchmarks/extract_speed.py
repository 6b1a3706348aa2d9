"""Extraction throughput: the cached pipeline against the encoder alone and a ClipCap-style loop.

    python benchmarks/extract_speed.py [--images 96]

(a) the ViT-B/32 encoder alone on ready-made tensors: the limit;
(b) decoding and encoding each image once per caption with batch size 1, as ClipCap's parse_coco.py does;
(c) `extract_features`: DataLoader workers decode, the encoder runs in batches, each image once;
    with the image processor's torchvision backend (the default), and again with its PIL one.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from common import build_vit_b32, make_coco_images, save_result, timed

from clipcap_cache.data.annotations import read_annotations
from clipcap_cache.data.images import default_num_workers, load_image
from clipcap_cache.extraction.encoder import load_clip
from clipcap_cache.extraction.features import FeatureConfig, extract_features


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    clip_dir = build_vit_b32(work / "vit-b32")
    annotations = make_coco_images(work / "images", args.images)
    encoder = load_clip(str(clip_dir), args.device)
    records = read_annotations(annotations)

    pixels = torch.randn(args.batch_size, 3, 224, 224)
    encoder.encode(pixels)  # warm-up
    batches = -(-args.images // args.batch_size)
    encoder_seconds = timed(lambda: [encoder.encode(pixels) for _ in range(batches)], repeat=2)
    encoder_ips = batches * args.batch_size / encoder_seconds

    naive_images = min(args.images, 16)

    def naive():
        for record in records[:naive_images]:
            for _ in record.captions:  # one decode and one forward per caption
                image = load_image(work / "images" / record.path)
                encoder.encode(encoder.processor(images=image, return_tensors="pt")["pixel_values"])

    naive_ips = naive_images / timed(naive)

    def pipeline(image_processor="torchvision"):
        out = work / "features.h5"
        return extract_features(
            FeatureConfig(
                annotations=str(annotations),
                images=str(work / "images"),
                out=str(out),
                clip_model=str(clip_dir),
                batch_size=args.batch_size,
                num_workers=default_num_workers(),
                device=args.device,
                overwrite=True,
                image_processor=image_processor,
            )
        )

    pipeline()  # warm-up (file cache)
    # Model loading is excluded, as for (a) and (b); worker start-up and HDF5 writing are included.
    # The two backends alternate, so that a slow spell of a shared machine hits both alike.
    runs = {"torchvision": [], "pil": []}
    for _ in range(args.repeat):
        for backend, found in runs.items():
            found.append(pipeline(backend).images_per_second)
    pipeline_ips, pil_ips = max(runs["torchvision"]), max(runs["pil"])
    shutil.rmtree(work)
    save_result(
        "extract_speed",
        {
            "images": args.images,
            "batch_size": args.batch_size,
            "workers": default_num_workers(),
            "device": str(encoder.device),
            "encoder_alone_images_per_s": round(encoder_ips, 2),
            "clipcap_style_images_per_s": round(naive_ips, 2),
            "pipeline_images_per_s": round(pipeline_ips, 2),
            "pipeline_vs_encoder": round(pipeline_ips / encoder_ips, 3),
            "pipeline_vs_clipcap_style": round(pipeline_ips / naive_ips, 2),
            "pipeline_pil_processor_images_per_s": round(pil_ips, 2),
            "runs_images_per_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "torchvision_vs_pil_processor": round(pipeline_ips / pil_ips, 3),
        },
    )


if __name__ == "__main__":
    main()
