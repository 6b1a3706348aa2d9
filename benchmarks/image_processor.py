"""CLIP image preprocessing on the CPU: the torchvision backend against the PIL one.

    python benchmarks/image_processor.py [--images 32]

Both backends of transformers' `CLIPImageProcessor` preprocess the same decoded 640x480 images
(ViT-B/32 settings: resize to 224 on the short side, centre crop, normalise), one image per call
as extraction's DataLoader workers do. Reports images/s for each, and the cosine similarity of the
ViT-B/32 (random weights) embeddings of their outputs: `extract-features` uses the faster one,
provided the embeddings agree (cosine >= 0.999).
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import build_vit_b32, make_coco_images, save_result
from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

from clipcap_cache.data.images import load_image
from clipcap_cache.hub import quiet_transformers

BACKENDS = ("pil", "torchvision")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    clip_dir = build_vit_b32(work / "vit-b32")
    make_coco_images(work / "images", args.images)
    images = [load_image(p) for p in sorted((work / "images").glob("*.jpg"))]
    with quiet_transformers():
        model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()

    speed, embeddings = {}, {}
    for backend in BACKENDS:
        with quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(clip_dir, backend=backend)
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            pixels = [
                processor(images=image, return_tensors="pt")["pixel_values"] for image in images
            ]
            best = min(best, time.perf_counter() - start)
        speed[backend] = round(len(images) / best, 1)
        with torch.no_grad():
            embeddings[backend] = model(pixel_values=torch.cat(pixels)).image_embeds
    cosine = torch.nn.functional.cosine_similarity(embeddings["pil"], embeddings["torchvision"])
    shutil.rmtree(work)
    save_result(
        "image_processor",
        {
            "images": len(images),
            "pil_images_per_s": speed["pil"],
            "torchvision_images_per_s": speed["torchvision"],
            "speedup": round(speed["torchvision"] / speed["pil"], 2),
            "cosine_min": round(float(cosine.min()), 7),
            "cosine_mean": round(float(cosine.mean()), 7),
        },
    )


if __name__ == "__main__":
    main()
