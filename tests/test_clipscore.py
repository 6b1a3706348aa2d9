"""CLIPScore and RefCLIPScore from the cache, against a direct computation with CLIPModel."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from clipcap_cache.data.cache import read_cache
from clipcap_cache.evaluation.clipscore import PROMPT, clipscore, load_clip_text


def direct_scores(clip_dir, image_paths, candidates, references):
    """CLIP-S and RefCLIP-S as Hessel et al. define them, with the full CLIPModel."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoImageProcessor.from_pretrained(clip_dir, backend="torchvision")
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    limit = model.config.text_config.max_position_embeddings

    def text(texts):
        tokens = tokenizer(
            [f"{PROMPT} {t}" for t in texts],
            padding=True,
            truncation=True,
            max_length=limit,
            return_tensors="pt",
        )
        return torch.nn.functional.normalize(
            model.get_text_features(**tokens).pooler_output, dim=-1
        )

    with torch.no_grad():
        pixels = processor(
            images=[Image.open(p).convert("RGB") for p in image_paths], return_tensors="pt"
        )["pixel_values"]
        images = torch.nn.functional.normalize(
            model.get_image_features(pixel_values=pixels).pooler_output, dim=-1
        )
        captions = text(candidates)
        clip_s = 2.5 * torch.clamp((images * captions).sum(-1), min=0)
        best = torch.stack(
            [
                torch.clamp((text(refs) @ captions[i]).max(), min=0)
                for i, refs in enumerate(references)
            ]
        )
        ref_s = torch.nan_to_num(2 * clip_s * best / (clip_s + best), nan=0.0)
    return clip_s, ref_s


def test_clipscore_equals_a_direct_clip_model_computation(shapes_cache, shapes, clip_dir):
    cache = read_cache(shapes_cache)
    _, root = shapes
    all_refs = cache.references()
    # Every image with every caption: right captions, captions of other images, and one that
    # matches nothing in particular. A random tiny CLIP's cosines have either sign, so some
    # 16 pairs score above 0 and some are floored there.
    texts = [all_refs[0][0], all_refs[5][1], all_refs[20][0], "a photo of nothing"]
    pairs = [(row, text) for row in (0, 5, 9, 14) for text in texts]
    rows = [row for row, _ in pairs]
    candidates = [text for _, text in pairs]
    references = [all_refs[r] for r in rows]
    clip_s, ref_s = direct_scores(
        clip_dir, [root / cache.image_paths[r] for r in rows], candidates, references
    )
    assert 4 <= (clip_s > 0.01).sum() <= 12 and (ref_s > 0.01).sum() >= 4
    found = clipscore(load_clip_text(str(clip_dir)), cache.embeddings[rows], candidates, references)
    # The cache stores float16 image embeddings: agreement to that precision.
    assert found["clipscore"] == pytest.approx(clip_s.mean().item(), abs=2e-3)
    assert found["refclipscore"] == pytest.approx(ref_s.mean().item(), abs=2e-3)


def test_evaluate_reports_clipscore_of_its_predictions(
    trained_run, shapes_cache, clip_dir, tmp_path
):
    out = tmp_path / "eval"
    run_cli(
        "evaluate",
        trained_run,
        "--features",
        shapes_cache,
        "--split",
        "test",
        "--greedy",
        "--max-tokens",
        "12",
        "--no-bertscore",
        "--clipscore",
        "--device",
        "cpu",
        "--out",
        out,
        check=0,
    )
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert_clipscore_from_the_cache(metrics, predictions, shapes_cache, clip_dir)


def assert_clipscore_from_the_cache(metrics, predictions, cache_path, clip_dir):
    """The written CLIPScore and RefCLIPScore equal those computed directly from the cache."""
    cache = read_cache(cache_path)
    row_of = {image_id: row for row, image_id in enumerate(cache.image_ids)}
    rows = [row_of[str(p["image_id"])] for p in predictions]
    all_refs = cache.references()
    expected = clipscore(
        load_clip_text(str(clip_dir)),
        cache.embeddings[rows],
        [p["caption"] for p in predictions],
        [all_refs[r] for r in rows],
    )
    assert metrics["clipscore"] == pytest.approx(expected["clipscore"], rel=1e-6)
    assert metrics["refclipscore"] == pytest.approx(expected["refclipscore"], rel=1e-6)


def test_tiny_clip_tokenizer_is_the_same_in_every_process():
    """The tiny CLIP's token ids must not change between runs, or its text features would."""
    from clipcap_cache.demo import all_demo_captions, build_tiny_clip_tokenizer

    build = (
        "import json; from clipcap_cache.demo import all_demo_captions, build_tiny_clip_tokenizer;"
        "print(json.dumps(build_tiny_clip_tokenizer(all_demo_captions()).get_vocab()))"
    )
    tokenizer = build_tiny_clip_tokenizer(all_demo_captions())
    for _ in range(2):
        other = subprocess.run(
            [sys.executable, "-c", build], capture_output=True, text=True, check=True
        )
        assert json.loads(other.stdout.splitlines()[-1]) == tokenizer.get_vocab()
    # Every byte has a word-final token, as in CLIP's vocabulary: no text maps to the unknown id.
    ids = tokenizer("Of 3 zebras, NONE jumped!?", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
