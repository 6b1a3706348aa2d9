"""A tiny *pretrained* CLIP and GPT-2, built offline in seconds, for the demo and the tests.

    clip_dir, gpt2_dir = build_testbed("data/demo/models")

The random tiny models of `demo.py` have the right shapes but know nothing: their image and text
towers do not agree, and their language model knows no language, so CLIPScore, retrieval and
self-critical training measure noise against them. The two models here are trained the way the
real ones are, on the synthetic shapes of `demo.py`:

- `build_pretrained_clip`: a tiny CLIP trained contrastively (symmetric image-text InfoNCE) on
  drawn shapes and their captions, so that an image embedding lies nearest its own captions;
- `build_pretrained_gpt2`: a tiny GPT-2 pretrained as a language model (next-token loss) on the
  caption text, with a byte-level BPE tokenizer, so that its samples are captions.

Both are written with `save_pretrained` beside a `testbed.json` that records their recipe, and are
loaded through the same `from_pretrained` path a hub name takes. A folder is built only when it is
missing or its recipe changed; it is built under a temporary name and renamed into place. Building
is seeded and runs on one thread, so it gives the same weights on every run.
"""

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clipcap_cache.demo import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    ShapeImage,
    all_demo_captions,
    build_tiny_clip_tokenizer,
    build_tiny_tokenizer,
    draw_shape,
    tiny_gpt2_config,
)
from clipcap_cache.files import write_json_atomic
from clipcap_cache.hub import quiet_transformers

log = logging.getLogger(__name__)
RECIPE_FILE = "testbed.json"  # beside the weights: the recipe a folder was built from


@dataclass(frozen=True)
class ClipRecipe:
    """How the tiny CLIP is built; a change rebuilds a cached folder."""

    version: int = 1  # raise when the code below changes what it builds
    seed: int = 0
    image_size: int = 24
    patch_size: int = 4
    projection_dim: int = 64
    vision_layers: int = 2
    images_per_combination: int = 30  # drawn training images per (colour, shape, background)
    images_per_step: int = 1  # of each combination, in every step
    steps: int = 400
    lr: float = 5e-3
    prompt_share: float = 0.5  # captions trained with CLIPScore's "A photo depicts" before them


@dataclass(frozen=True)
class Gpt2Recipe:
    """How the tiny GPT-2 is built; a change rebuilds a cached folder."""

    version: int = 1
    seed: int = 0
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 2
    dropout: float = 0.1  # as GPT-2's own config: fine-tuning then runs with dropout on
    steps: int = 400
    lr: float = 3e-3


def build_testbed(cache_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """The pretrained tiny CLIP and GPT-2 under `cache_dir` (`clip/`, `gpt2/`), built if needed.

    When both are to be built and the machine has a second core, the GPT-2 is built in a second
    process while this one builds the CLIP: each build runs on one thread of its own, so the
    weights are the same as when they are built one after the other.
    """
    cache_dir = Path(cache_dir)
    clip_recipe, gpt2_recipe = ClipRecipe(seed=seed), Gpt2Recipe(seed=seed)
    concurrent = (
        _usable_cores() > 1
        and not _is_current(cache_dir / "clip", "clip", clip_recipe)
        and not _is_current(cache_dir / "gpt2", "gpt2", gpt2_recipe)
    )
    if not concurrent:
        clip_dir = build_pretrained_clip(cache_dir / "clip", clip_recipe)
        return clip_dir, build_pretrained_gpt2(cache_dir / "gpt2", gpt2_recipe)
    # A fresh interpreter, not multiprocessing: a forked child would inherit this process's torch
    # thread pools, and a spawned one re-imports the caller's main module (a script without a
    # `__main__` guard would run again). If it fails, the GPT-2 is built here, which reports why.
    package_root = str(Path(__file__).resolve().parents[1])  # importable in the child too
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _GPT2_CHILD,
            str(cache_dir / "gpt2"),
            json.dumps(asdict(gpt2_recipe)),
        ],
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        clip_dir = build_pretrained_clip(cache_dir / "clip", clip_recipe)
    except BaseException:
        child.kill()
        child.communicate()
        shutil.rmtree(cache_dir / f"gpt2.tmp-{child.pid}", ignore_errors=True)
        raise
    _, errors = child.communicate()
    if child.returncode != 0:
        last = (errors.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        log.warning("building the GPT-2 in a second process failed (%s): building it here", last)
    return clip_dir, build_pretrained_gpt2(cache_dir / "gpt2", gpt2_recipe)  # reused when built


_GPT2_CHILD = """
import json, sys
from clipcap_cache.testbed import Gpt2Recipe, build_pretrained_gpt2
build_pretrained_gpt2(sys.argv[1], Gpt2Recipe(**json.loads(sys.argv[2])))
"""


def recorded_recipes(cache_dir: str | Path) -> tuple[dict | None, dict | None] | None:
    """The recipes the testbed under `cache_dir` was built from, or None when it is not built."""
    cache_dir = Path(cache_dir)
    recorded = (_recorded(cache_dir / "clip"), _recorded(cache_dir / "gpt2"))
    return None if recorded == (None, None) else recorded


def build_pretrained_clip(out_dir: str | Path, recipe: ClipRecipe | None = None) -> Path:
    """A tiny CLIP trained contrastively on the shapes, saved in `out_dir` (reused if current)."""
    return _cached(Path(out_dir), "clip", asdict(recipe or ClipRecipe()), _train_clip)


def build_pretrained_gpt2(out_dir: str | Path, recipe: Gpt2Recipe | None = None) -> Path:
    """A tiny GPT-2 pretrained on the caption text, saved in `out_dir` (reused if current)."""
    return _cached(Path(out_dir), "gpt2", asdict(recipe or Gpt2Recipe()), _train_gpt2)


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _is_current(out_dir: Path, kind: str, recipe) -> bool:
    return _recorded(out_dir) == {"kind": kind, "recipe": asdict(recipe)}


def _cached(out_dir: Path, kind: str, recipe: dict, build) -> Path:
    record = {"kind": kind, "recipe": recipe}
    if _recorded(out_dir) == record:
        return out_dir
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # One thread: a float sum split over more threads rounds differently, and after hundreds of
    # steps the weights would depend on the machine; the models are too small to gain from more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build(tmp, **recipe)
    finally:
        torch.set_num_threads(threads)
    write_json_atomic(tmp / RECIPE_FILE, record)
    if _recorded(out_dir) == record:  # another process finished the same build first
        shutil.rmtree(tmp)
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a stale build of another recipe: only this module writes it
    os.replace(tmp, out_dir)
    return out_dir


def _recorded(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _combinations() -> list[ShapeImage]:
    return [
        ShapeImage(color, shape, background)
        for color in COLORS
        for shape in SHAPES
        for background in BACKGROUNDS
    ]


def _train_clip(
    directory: Path,
    version: int,
    seed: int,
    image_size: int,
    patch_size: int,
    projection_dim: int,
    vision_layers: int,
    images_per_combination: int,
    images_per_step: int,
    steps: int,
    lr: float,
    prompt_share: float,
) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from clipcap_cache.evaluation.clipscore import PROMPT

    tokenizer = build_tiny_clip_tokenizer(all_demo_captions() + [PROMPT])
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=projection_dim,
        ),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )

    # Training images: fresh drawings (not the demo's files) of every combination, preprocessed
    # once by the processor that extraction uses; every caption tokenized once, with and without
    # CLIPScore's prompt. A step takes `images_per_step` drawings of every combination and all
    # the captions, each with or without the prompt: a multi-positive InfoNCE whose positives
    # are the pairs of one combination (a drawing's two captions, a caption's drawings).
    rng = random.Random(seed + 1000)
    combinations = _combinations()
    drawings = [
        draw_shape(item, rng) for item in combinations for _ in range(images_per_combination)
    ]
    pixels = processor(images=drawings, return_tensors="pt")["pixel_values"]
    pixels = pixels.view(len(combinations), images_per_combination, *pixels.shape[1:])
    captions = [c for item in combinations for c in item.captions()]  # 2 per combination
    prompted = tokenizer([f"{PROMPT} {c}" for c in captions], padding=True, return_tensors="pt")
    width = prompted["input_ids"].shape[1]
    plain = tokenizer(captions, padding="max_length", max_length=width, return_tensors="pt")
    text_owner = torch.arange(len(combinations)).repeat_interleave(2)  # (C,)
    image_owner = torch.arange(len(combinations)).repeat_interleave(images_per_step)  # (I,)
    positives = (image_owner[:, None] == text_owner[None, :]).float()  # (I, C)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picks = torch.randint(
            images_per_combination, (len(combinations), images_per_step), generator=generator
        )
        batch_pixels = pixels[torch.arange(len(combinations))[:, None], picks].flatten(0, 1)
        use_prompt = (torch.rand(len(captions), generator=generator) < prompt_share)[:, None]
        input_ids = torch.where(use_prompt, prompted["input_ids"], plain["input_ids"])
        mask = torch.where(use_prompt, prompted["attention_mask"], plain["attention_mask"])
        out = model(input_ids=input_ids, attention_mask=mask, pixel_values=batch_pixels)
        logits = out.logits_per_image  # (I, C), scaled by the learnt temperature
        loss = 0.5 * (
            torch.nn.functional.cross_entropy(logits, positives / positives.sum(1, keepdim=True))
            + torch.nn.functional.cross_entropy(
                logits.T, positives.T / positives.T.sum(1, keepdim=True)
            )
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with quiet_transformers():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        processor.save_pretrained(directory)


def _train_gpt2(
    directory: Path,
    version: int,
    seed: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    dropout: float,
    steps: int,
    lr: float,
) -> None:
    from transformers import GPT2LMHeadModel

    captions = all_demo_captions()
    tokenizer = build_tiny_tokenizer(captions)
    torch.manual_seed(seed)
    config = tiny_gpt2_config(tokenizer, n_embd, n_layer, n_head, dropout)
    model = GPT2LMHeadModel(config)
    # Each caption as a document: EOS (GPT-2's BOS) + caption + EOS, right-padded with EOS; the
    # padding carries no label, so the model learns to end a caption with exactly one EOS.
    eos = tokenizer.eos_token_id
    rows = [[eos, *tokenizer(c)["input_ids"], eos] for c in captions]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    labels[:, 0] = -100  # nothing predicts the first token
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with quiet_transformers():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
