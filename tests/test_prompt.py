"""`--prompt`: captions that begin with a given text and continue it, in every decoding mode."""

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from clipcap_cache.data.cache import read_cache
from clipcap_cache.demo import COLORS
from clipcap_cache.errors import ClipcapError
from clipcap_cache.inference.generate import decode_config, generate_captions


@pytest.fixture(scope="module")
def captioner(pretrained_run):
    """A captioner on the testbed: its GPT-2 was pretrained on the captions, as real ones are."""
    from clipcap_cache import Captioner

    return Captioner.from_checkpoint(pretrained_run, device="cpu", load_encoder=False)


@pytest.fixture(scope="module")
def test_embeddings(pretrained_shapes_cache):
    cache = read_cache(pretrained_shapes_cache)
    rows = [i for i, split in enumerate(cache.splits) if split == "test"][:6]
    return torch.from_numpy(cache.embeddings[rows]).float()


@pytest.mark.parametrize(
    "mode", [dict(greedy=True), dict(beams=3, num_captions=2), dict(sample=True, num_captions=2)]
)
def test_every_caption_begins_with_the_prompt(captioner, test_embeddings, mode):
    found = captioner.caption_embeddings(
        test_embeddings, decode_config(prompt="a circle in", max_tokens=8, **mode)
    )
    texts = [c["caption"] for image in found for c in image]
    assert len(texts) == len(test_embeddings) * (1 if "greedy" in mode else 2)
    assert all(t.startswith("a circle in ") for t in texts), texts
    # The continuation is the model's: the template of "a SHAPE in COLOUR on BACKGROUND".
    assert sum(t.split()[3] in COLORS for t in texts) >= len(texts) * 0.8, texts
    assert all(isinstance(c["score"], float) and c["score"] < 0 for i in found for c in i)


def test_the_prompt_changes_the_continuation(captioner, test_embeddings):
    # The captions follow two templates: "a COLOUR SHAPE on a BACKGROUND background" and "a SHAPE
    # in COLOUR on BACKGROUND". A prompt of either template's start must be continued in it.
    def greedy(prompt):
        found = captioner.caption_embeddings(
            test_embeddings, decode_config(greedy=True, prompt=prompt)
        )
        return [i[0]["caption"] for i in found]

    shape_first, colour_first = greedy("a triangle in"), greedy("a blue")
    assert all(c.startswith("a triangle in ") for c in shape_first), shape_first
    assert all(c.startswith("a blue ") for c in colour_first), colour_first
    assert all(c.endswith(" background") for c in colour_first), colour_first
    assert not any(c.endswith(" background") for c in shape_first), shape_first


def test_context_rows_of_unequal_length_are_left_padded_without_changing_a_row(
    captioner, test_embeddings
):
    model, tokenizer = captioner.model, captioner.tokenizer
    decode = decode_config(greedy=True, prompt="a", max_tokens=10)
    context = [tokenizer("a red circle on a white background")["input_ids"], []]
    pair = generate_captions(
        model, tokenizer, test_embeddings[:2], decode, with_scores=True, context_ids=context
    )
    alone = generate_captions(
        model, tokenizer, test_embeddings[1:2], decode, with_scores=True, context_ids=[[]]
    )
    assert pair[1][0][0] == alone[0][0][0]
    assert pair[1][0][1] == pytest.approx(alone[0][0][1], abs=1e-5)
    assert pair[0][0][0].startswith("a ")  # the context is not part of the caption


@pytest.mark.bad_input("bad option")
def test_an_empty_prompt_is_refused():
    with pytest.raises(ClipcapError, match="--prompt is empty"):
        decode_config(prompt="  ")


@pytest.mark.bad_input("bad option")
@pytest.mark.parametrize(
    "command",
    [["caption", "IMAGE", "--checkpoint", "RUN"], ["evaluate", "RUN", "--features", "H5"]],
)
@pytest.mark.parametrize("prompt", ["", "a red circle " * 60])
def test_a_bad_prompt_gets_one_error_line(
    command, prompt, checkpoint_run, shapes, shapes_cache, tmp_path
):
    annotations, root = shapes
    image = sorted((root / "images").iterdir())[0]
    values = {"IMAGE": image, "RUN": checkpoint_run, "H5": shapes_cache}
    args = [values.get(a, a) for a in command]
    if command[0] == "evaluate":
        args += ["--out", tmp_path / "eval", "--no-bertscore"]
    error = assert_one_line_error(run_cli(*args, "--prompt", prompt))
    assert "--prompt is " + ("empty" if not prompt else "too long") in error, error
    assert not (tmp_path / "eval").exists()


def test_caption_and_evaluate_take_the_prompt(
    pretrained_run, shapes, pretrained_shapes_cache, tmp_path
):
    import json

    annotations, root = shapes
    image = sorted((root / "images").iterdir())[0]
    result = run_cli(
        "caption", image, "--checkpoint", pretrained_run, "--greedy", "--prompt", "a square in"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split("\t")[1].startswith("a square in ")
    out = tmp_path / "eval"
    run_cli(
        "evaluate", pretrained_run, "--features", pretrained_shapes_cache, "--out", out, "--greedy",
        "--no-bertscore", "--prompt", "a square in", check=0,
    )  # fmt: skip
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 24
    assert all(p["caption"].startswith("a square in ") for p in predictions)
