"""The pretrained tiny testbed: its CLIP towers agree, its GPT-2 writes captions, it is cached."""

import pytest
import torch
from PIL import Image

from clipcap_cache.data.annotations import TEST, read_annotations
from clipcap_cache.demo import all_demo_captions, make_shapes_dataset


@pytest.fixture(scope="module")
def demo_test_split(tmp_path_factory):
    """The demo's own dataset (same counts and seed as `clipcap demo`): its test records."""
    root = tmp_path_factory.mktemp("demo-shapes")
    annotations = make_shapes_dataset(root)
    return root, [r for r in read_annotations(annotations) if r.split == TEST]


@pytest.fixture(scope="module")
def test_embeddings(pretrained_clip_dir, demo_test_split):
    """The test images' `image_embeds`, through the encoder that extraction uses."""
    from clipcap_cache.extraction.encoder import load_clip

    root, records = demo_test_split
    encoder = load_clip(str(pretrained_clip_dir), "cpu")
    images = [Image.open(root / r.path).convert("RGB") for r in records]
    return encoder.encode(encoder.processor(images=images, return_tensors="pt")["pixel_values"])


def test_clip_retrieves_the_right_caption_of_test_images(
    pretrained_clip_dir, demo_test_split, test_embeddings
):
    from clipcap_cache.evaluation.clipscore import load_clip_text

    _, records = demo_test_split
    captions = sorted(set(all_demo_captions()))  # 72 distinct captions, 36 combinations
    text = load_clip_text(str(pretrained_clip_dir))
    similarity = torch.nn.functional.normalize(test_embeddings, dim=-1) @ text.encode(captions).T
    best = similarity.argmax(1)
    recall = sum(
        captions[b] in r.captions for b, r in zip(best.tolist(), records, strict=True)
    ) / len(records)
    assert recall >= 0.8, recall  # chance is 1/36


def test_clipscore_of_a_right_caption_is_far_above_a_wrong_one(
    pretrained_clip_dir, demo_test_split, test_embeddings
):
    from clipcap_cache.evaluation.clipscore import clipscore, load_clip_text

    _, records = demo_test_split
    text = load_clip_text(str(pretrained_clip_dir))
    right = [r.captions[0] for r in records]
    # Another test image's caption, of a different colour or shape.
    wrong = []
    for r in records:
        other = next(o for o in records if o.captions[0].split()[1:3] != r.captions[0].split()[1:3])
        wrong.append(other.captions[0])
    right_score = clipscore(text, test_embeddings, right)["clipscore"]
    wrong_score = clipscore(text, test_embeddings, wrong)["clipscore"]
    assert right_score > 1.5 and wrong_score < right_score - 1.0, (right_score, wrong_score)


def test_gpt2_samples_are_captions(pretrained_gpt2_dir):
    from transformers import GPT2LMHeadModel

    from clipcap_cache.model import load_tokenizer

    model = GPT2LMHeadModel.from_pretrained(pretrained_gpt2_dir).eval()
    tokenizer = load_tokenizer(str(pretrained_gpt2_dir))
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    out = model.generate(
        torch.full((32, 1), eos),
        attention_mask=torch.ones(32, 1, dtype=torch.long),
        do_sample=True,
        max_new_tokens=16,
        pad_token_id=eos,
    )
    texts = [t.strip() for t in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)]
    known = set(all_demo_captions())
    words = {w for c in known for w in c.split()}
    assert all(set(t.split()) <= words for t in texts), texts
    assert sum(t in known for t in texts) >= 28, texts  # samples from the model, not its argmax
    assert len(set(texts)) >= 16, texts


def test_a_built_testbed_is_reused_and_rebuilt_when_its_recipe_changes(tmp_path):
    from clipcap_cache.testbed import ClipRecipe, build_pretrained_clip

    cheap = ClipRecipe(steps=1, images_per_combination=1)
    folder = build_pretrained_clip(tmp_path / "clip", cheap)
    weights = folder / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert build_pretrained_clip(tmp_path / "clip", cheap) == folder
    assert weights.stat().st_mtime_ns == built
    build_pretrained_clip(tmp_path / "clip", ClipRecipe(steps=2, images_per_combination=1))
    assert weights.stat().st_mtime_ns != built
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]  # no temporary folder left
