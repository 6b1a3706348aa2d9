"""Shared helpers for the benchmarks: full-size random models, COCO-sized images, timing."""

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcap_cache.hub import quiet_transformers

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def build_vit_b32(directory: Path) -> Path:
    """A ViT-B/32 CLIP (random weights) with the OpenAI preprocessing, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    with quiet_transformers():
        CLIPModel(CLIPConfig()).save_pretrained(directory)  # the defaults are ViT-B/32, 512-d
        CLIPImageProcessor().save_pretrained(directory)
    return directory


def build_gpt2_124m(directory: Path) -> Path:
    """GPT-2 124M (random weights) with a byte-level BPE tokenizer, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from clipcap_cache.demo import build_tiny_tokenizer

    if (directory / "config.json").exists():
        return directory
    tokenizer = build_tiny_tokenizer(coco_like_captions(200), vocab_size=2000)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id
    )
    with quiet_transformers():
        GPT2LMHeadModel(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


WORDS = (
    "a man woman dog cat riding sitting on the with of red blue table street bus plate pizza near next to"
).split()


def coco_like_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of COCO's typical length (10 to 14 words)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(10, 15))) for _ in range(n)]


def write_synthetic_cache(path: Path, images: int, captions_per_image: int = 5) -> list[str]:
    """A complete train-only cache of random 512-d float16 embeddings and COCO-length captions.

    Returns the captions, in the cache's order.
    """
    from clipcap_cache.data.cache import write_cache

    captions = coco_like_captions(images * captions_per_image)
    write_cache(
        path,
        embeddings=np.random.default_rng(0).standard_normal((images, 512)).astype(np.float16),
        image_ids=[str(i) for i in range(images)],
        image_paths=[f"{i}.jpg" for i in range(images)],
        splits=["train"] * images,
        captions=captions,
        caption_image_index=np.repeat(np.arange(images), captions_per_image),
        failed_paths=[],
        failed_reasons=[],
        attrs={"clip_model": "synthetic", "embedding_dim": 512, "complete": True},
    )
    return captions


def make_coco_images(root: Path, n: int, captions_per_image: int = 5) -> Path:
    """n random 640x480 JPEGs and a COCO captions file with 5 captions each."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    captions = coco_like_captions(n * captions_per_image)
    for i in range(n):
        name = f"{i:06d}.jpg"
        if not (root / name).exists():
            # Smooth noise compresses like a photo, unlike white noise.
            small = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
            Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(root / name, quality=90)
        images.append({"id": i, "file_name": name})
        for j in range(captions_per_image):
            annotations.append({"image_id": i, "caption": captions[i * captions_per_image + j]})
    path = root / "captions_train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def coco_cache(work: Path, images: int) -> tuple[Path, Path, Path]:
    """Random ViT-B/32 and GPT-2 124M, `images` COCO-like JPEGs and their feature cache.

    Returns the CLIP folder, the GPT-2 folder and the cache; the JPEGs are in `work/images`.
    """
    from clipcap_cache.extraction.features import FeatureConfig, extract_features

    clip_dir, gpt2_dir = build_vit_b32(work / "vit-b32"), build_gpt2_124m(work / "gpt2")
    annotations = make_coco_images(work / "images", images)
    features = work / "features.h5"
    extract_features(
        FeatureConfig(
            annotations=str(annotations),
            images=str(work / "images"),
            out=str(features),
            clip_model=str(clip_dir),
            num_workers=0,
        )
    )
    return clip_dir, gpt2_dir, features


def timed(function, *args, repeat: int = 1, **kwargs) -> float:
    """Best wall time of `repeat` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def save_result(name: str, result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    result = {"machine": machine(), **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
