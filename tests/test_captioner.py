"""`Captioner`: one load, images as paths, PIL images or bytes, captions with their scores."""

import h5py
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

from clipcap_cache import Captioner
from clipcap_cache.data.cache import read_cache
from clipcap_cache.demo import build_tiny_clip
from clipcap_cache.errors import ClipcapError
from clipcap_cache.extraction.encoder import load_clip
from clipcap_cache.inference.generate import decode_config


@pytest.fixture(scope="module")
def image_paths(shapes):
    annotations, root = shapes
    return sorted((root / "images").iterdir())[:3]


def test_paths_pil_images_and_bytes_give_the_same_captions(captioner, image_paths, trained_run):
    path = image_paths[0]
    with Image.open(path) as image:
        pil = image.copy()
    by_path, by_pil, by_bytes = captioner([path, pil, path.read_bytes()], beams=3, max_tokens=12)
    assert by_path == by_pil == by_bytes
    # The command line captions through the same class: the same best caption.
    result = run_cli(
        "caption", path, "--checkpoint", trained_run, "--beams", "3", "--max-tokens", "12"
    )
    assert result.stdout.strip().split("\t")[1] == by_path[0]["caption"]


def test_scores_are_the_mean_token_log_probability(captioner, image_paths):
    # Greedy decoding through generate()'s own scores (incremental, KV-cached) must give the
    # score that Captioner computes in one forward pass.
    [[found]] = captioner([image_paths[1]], greedy=True, max_tokens=12)
    model, tokenizer = captioner.model, captioner.tokenizer
    pixels = captioner.preprocess(image_paths[1])[None]
    with torch.no_grad():
        prefix = model.prefix_embeddings(captioner.encoder.encode(pixels))
        out = model.gpt2.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
            generation_config=decode_config(greedy=True, max_tokens=12).generation_config(
                tokenizer.eos_token_id, tokenizer.eos_token_id
            ),
            output_scores=True,
            return_dict_in_generate=True,
        )
    log_probs = torch.stack([s.log_softmax(-1) for s in out.scores], 1)[0]  # (T, V)
    tokens = out.sequences[0]
    chosen = log_probs.gather(-1, tokens[:, None])[:, 0]
    eos = (tokens == tokenizer.eos_token_id).nonzero()
    n = int(eos[0]) + 1 if len(eos) else len(tokens)
    assert found["score"] == pytest.approx(chosen[:n].mean().item(), abs=1e-4)
    assert tokenizer.decode(tokens[: n - 1]).strip() == found["caption"]

    three = captioner([image_paths[1]], beams=4, num_captions=3)[0]
    assert len({c["caption"] for c in three}) == 3
    assert all(c["score"] <= 0 for c in three)


def test_a_bad_image_is_an_error_entry_or_raises(captioner, image_paths):
    results = captioner.caption([b"not an image", image_paths[0]], decode_config(greedy=True))
    assert results[0].error == "not an image" and not results[0].captions
    assert results[1].error is None and len(results[1].captions) == 1
    with pytest.raises(ClipcapError, match="image 0: not an image"):
        captioner([b"not an image"])


@pytest.mark.bad_input("message")
def test_a_clip_model_of_another_size_is_refused(tmp_path, captioner):
    other = load_clip(str(build_tiny_clip(tmp_path / "clip32", projection_dim=32)), "cpu")
    with pytest.raises(ClipcapError, match="holds 32-d CLIP embeddings, but .* expects 64-d"):
        Captioner(captioner.model, captioner.tokenizer, captioner.config, other)


@pytest.mark.bad_input("message")
def test_evaluate_refuses_a_cache_of_another_clip_model(tmp_path, checkpoint_run, shapes_cache):
    cache = tmp_path / "other.h5"
    cache.write_bytes(shapes_cache.read_bytes())
    with h5py.File(cache, "r+") as f:
        f.attrs["clip_model"] = "openai/clip-vit-large-patch14"
    assert read_cache(cache).attrs["clip_model"] == "openai/clip-vit-large-patch14"
    out = tmp_path / "eval"
    result = run_cli(
        "evaluate", checkpoint_run, "--features", cache, "--no-bertscore", "--out", out
    )
    assert "comes from CLIP model openai/clip-vit-large-patch14" in assert_one_line_error(result)
    assert not out.exists()
