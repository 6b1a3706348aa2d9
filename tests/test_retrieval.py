"""`clipcap embed-text`, retrieval-augmented training and captioning, and training from text alone.

The mechanics run on the tiny random models of conftest.py: what the text file records, that
embed-text resumes, that an image's own captions are never retrieved, that the loss is on the
target caption only, what the checkpoint records, and that every inference path retrieves (from
another datastore too) and says what it retrieved.
"""

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_line_error, extract_shapes, run_cli
from safetensors.torch import load_file
from test_train import _saved_step, train_args

from clipcap_cache import Captioner
from clipcap_cache.checkpoint import load_train_state
from clipcap_cache.data import cache as feature_cache
from clipcap_cache.data.annotations import read_annotations
from clipcap_cache.demo import COLORS, SHAPES
from clipcap_cache.evaluation.clipscore import load_clip_text
from clipcap_cache.extraction import text as text_embedding
from clipcap_cache.inference.generate import DecodeConfig
from clipcap_cache.model import IGNORE_INDEX, count_parameters, load_tokenizer
from clipcap_cache.retrieval import (
    DEFAULT_SEPARATOR,
    DEFAULT_TEMPLATE,
    Datastore,
    RetrievalSettings,
    Retriever,
)
from clipcap_cache.training.data import caption_data


@pytest.fixture(scope="module")
def shapes_text(tmp_path_factory, shapes_cache):
    """The text file of the shapes cache's captions (every split)."""
    out = tmp_path_factory.mktemp("text") / "shapes_text.h5"
    run_cli("embed-text", shapes_cache, "--out", out, "--batch-size", "64", check=0)
    return out


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory, shapes_cache, shapes_text, gpt2_dir):
    out = tmp_path_factory.mktemp("runs") / "retrieval"
    args = train_args(shapes_cache, out, gpt2_dir, "--retrieval", "2", "--datastore", shapes_text)
    run_cli(*args, "--eval-images", "4", check=0)
    return out


# ------------------------------------------------------------------ embed-text


def test_embed_text_records_each_caption_with_its_image_and_the_clip_model(
    shapes, shapes_cache, shapes_text, clip_dir, tmp_path
):
    found = feature_cache.read_cache(shapes_text)
    assert feature_cache.is_text(found.attrs)
    assert json.loads(run_cli("inspect", shapes_text, "--json", check=0).stdout)["kind"] == "text"
    assert found.attrs["clip_model"] == str(clip_dir)
    assert found.attrs["source"].startswith("shapes.h5:")
    images = feature_cache.read_cache(shapes_cache)
    # One row per caption, in the cache's order, with its image's id, path and split.
    assert found.captions == images.captions
    rows = images.caption_image_index
    assert found.image_ids == [images.image_ids[r] for r in rows]
    assert found.image_paths == [images.image_paths[r] for r in rows]
    assert found.splits.tolist() == images.splits[rows].tolist()
    # The embeddings are the text tower's, of the captions as they are.
    expected = load_clip_text(str(clip_dir)).embed(found.captions[:5])
    np.testing.assert_allclose(found.embeddings[:5].astype(np.float32), expected, atol=2e-3)

    # From the annotation file: the same captions of one split, no image read.
    annotations, _ = shapes
    out = tmp_path / "train_text.h5"
    run_cli("embed-text", annotations, "--out", out, "--clip-model", clip_dir, "--split", "train")
    train = feature_cache.read_cache(out)
    records = [r for r in read_annotations(annotations) if r.split == "train"]
    assert train.captions == [c for r in records for c in r.captions]
    assert set(train.splits.tolist()) == {"train"}
    assert train.image_ids[:2] == [records[0].image_id] * 2
    np.testing.assert_array_equal(train.embeddings, found.embeddings[: len(train.captions)])
    again = run_cli(
        "embed-text", annotations, "--out", out, "--clip-model", clip_dir, "--split", "train"
    )
    assert "already complete" in again.stdout


def test_embed_text_resumes_after_a_crash_and_writes_nothing_half_done(
    shapes, clip_dir, tmp_path, monkeypatch
):
    from clipcap_cache.evaluation import clipscore

    annotations, _ = shapes
    reference = tmp_path / "reference.h5"
    config = dict(source=str(annotations), clip_model=str(clip_dir), shard_size=100)
    text_embedding.embed_text(text_embedding.TextConfig(out=str(reference), **config))

    calls, crash_at = [], [3]
    real_embed = clipscore.ClipText.embed

    def crashing(self, texts, batch_size=256):
        calls.append(len(texts))
        if len(calls) == crash_at[0]:
            raise RuntimeError("the machine went away")
        return real_embed(self, texts, batch_size)

    monkeypatch.setattr(clipscore.ClipText, "embed", crashing)
    out = tmp_path / "text.h5"
    with pytest.raises(RuntimeError):
        text_embedding.embed_text(text_embedding.TextConfig(out=str(out), **config))
    assert not out.exists()  # never a partial file
    assert len(list((tmp_path / "text.h5.parts").glob("shard-*"))) == 2
    calls.clear()
    crash_at[0] = None
    text_embedding.embed_text(text_embedding.TextConfig(out=str(out), **config))
    assert len(calls) == 3  # 416 captions in shards of 100: the two done are not embedded again
    assert not (tmp_path / "text.h5.parts").exists()
    a, b = feature_cache.read_cache(reference), feature_cache.read_cache(out)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.captions == b.captions and a.image_ids == b.image_ids


@pytest.mark.bad_input("bad option")
def test_embed_text_refuses_another_clip_model_for_a_cache(shapes_cache, tmp_path):
    out = tmp_path / "text.h5"
    result = run_cli("embed-text", shapes_cache, "--out", out, "--clip-model", "openai/other")
    assert "was made with CLIP model" in assert_one_line_error(result)
    assert not out.exists()


@pytest.mark.bad_input("message")
def test_embed_text_refuses_a_missing_source_and_an_existing_text_file(shapes_text, tmp_path):
    result = run_cli("embed-text", tmp_path / "nope.json", "--out", tmp_path / "t.h5")
    assert "source not found" in assert_one_line_error(result)
    result = run_cli("embed-text", shapes_text, "--out", tmp_path / "t.h5")
    assert "already a text file" in assert_one_line_error(result)


# ------------------------------------------------------------------ the datastore and search


def _copied_as_datastore(source_cache, out, captions_per_image=2, tail=""):
    """A text file whose entries are copies of a cache's image embeddings, each caption unique.

    Every image's nearest entries are then its own (cosine 1): the worst case for leakage. `tail`
    is appended to every caption.
    """
    images = feature_cache.read_cache(source_cache)
    rows = np.repeat(np.arange(len(images.image_ids)), captions_per_image)
    feature_cache.write_cache(
        out,
        embeddings=images.embeddings[rows],
        image_ids=[images.image_ids[r] for r in rows],
        image_paths=[images.image_paths[r] for r in rows],
        splits=images.splits[rows].tolist(),
        captions=[f"caption {j} of image {images.image_ids[r]}{tail}" for j, r in enumerate(rows)],
        caption_image_index=np.arange(len(rows)),
        failed_paths=[],
        failed_reasons=[],
        attrs={
            "kind": feature_cache.TEXT_KIND,
            "clip_model": images.attrs["clip_model"],
            "embedding_dim": images.embedding_dim,
        },
    )
    return out


def test_training_never_retrieves_an_images_own_captions(shapes_cache, gpt2_dir, tmp_path):
    datastore = Datastore.open(_copied_as_datastore(shapes_cache, tmp_path / "copies.h5"))
    cache = feature_cache.open_cache(shapes_cache)
    rows = cache.rows_of_split("train")
    ids = cache.image_ids_of(rows)
    # Without the images' ids, each one's own captions come first: they are its exact copies.
    unguarded = datastore.search(cache.embeddings[rows], 3)
    assert all(datastore.image_ids[row[0]] == i for row, i in zip(unguarded, ids, strict=True))

    settings = RetrievalSettings(3, DEFAULT_TEMPLATE, DEFAULT_SEPARATOR, str(datastore.path))
    retriever = Retriever(datastore, settings, load_tokenizer(str(gpt2_dir)))
    data, _ = caption_data(cache, rows, retriever.tokenizer, 40, retriever)
    for row, image_id in zip(rows.tolist(), ids, strict=True):
        retrieved = data.prompts.retrieved[row]
        assert len(retrieved) == 3
        assert not any(c.endswith(f"of image {image_id}") for c in retrieved), (row, retrieved)


def test_the_loss_is_on_the_target_caption_only(shapes_cache, shapes_text, gpt2_dir):
    cache = feature_cache.open_cache(shapes_cache)
    rows = cache.rows_of_split("train")[:8]
    tokenizer = load_tokenizer(str(gpt2_dir))
    settings = RetrievalSettings(2, DEFAULT_TEMPLATE, DEFAULT_SEPARATOR, str(shapes_text))
    retriever = Retriever(Datastore.open(shapes_text), settings, tokenizer)
    plain, _ = caption_data(cache, rows, tokenizer, 40)
    prompted, _ = caption_data(cache, rows, tokenizer, 40, retriever)
    samples = np.arange(len(plain))
    _, plain_ids, plain_labels = plain.batch(samples, 0)
    _, input_ids, labels = prompted.batch(samples, 0)
    for j in range(len(samples)):
        row = int(cache.caption_image_index[plain.captions[j]])
        prompt = retriever.prompt_ids([prompted.prompts.retrieved[row]])[0]
        assert input_ids[j, : len(prompt)].tolist() == prompt
        assert (labels[j, : len(prompt)] == IGNORE_INDEX).all()
        # After the prompt come the caption and EOS, labelled exactly as without retrieval.
        kept = plain_labels[j][plain_labels[j] != IGNORE_INDEX]
        assert labels[j][labels[j] != IGNORE_INDEX].tolist() == kept.tolist()
    text = tokenizer.decode(input_ids[0, : len(prompt)])
    assert text.startswith("Similar images show ") and text.endswith(" This image shows")
    assert prompted.count_tokens(samples) == plain.count_tokens(samples)


# ------------------------------------------------------------------ training and inference


def test_a_retrieval_run_records_its_settings_and_every_path_retrieves(
    retrieval_run, shapes, shapes_cache, shapes_text, tmp_path
):
    config = json.loads((retrieval_run / "checkpoints" / "best" / "config.json").read_text())
    assert config["retrieval"] == {
        "k": 2,
        "template": DEFAULT_TEMPLATE,
        "separator": DEFAULT_SEPARATOR,
        "datastore": str(shapes_text.resolve()),
    }
    store = feature_cache.read_cache(shapes_text)
    known = set(store.captions)

    _, root = shapes
    image = sorted((root / "images").glob("*.png"))[-1]
    out = tmp_path / "captions.json"
    run_cli(
        "caption", image, "--checkpoint", retrieval_run, "--format", "json", "--out", out, check=0
    )
    (result,) = json.loads(out.read_text())
    assert len(result["retrieved"]) == 2 and set(result["retrieved"]) <= known

    evaluated = tmp_path / "eval"
    run_cli("evaluate", retrieval_run, "--features", shapes_cache, "--out", evaluated,
            "--no-bertscore", "--greedy", check=0)  # fmt: skip
    predictions = json.loads((evaluated / "predictions.json").read_text())
    cache = feature_cache.read_cache(shapes_cache)
    rows = cache.rows_of_split("test")
    captioner = Captioner.from_checkpoint(retrieval_run, "cpu", load_encoder=False)
    expected = captioner.retrieve(
        torch.from_numpy(cache.embeddings[rows]), [cache.image_ids[r] for r in rows]
    )
    assert [p["retrieved"] for p in predictions] == expected


def test_a_swapped_datastore_is_the_one_retrieved_from(retrieval_run, shapes_cache, tmp_path):
    other = _copied_as_datastore(shapes_cache, tmp_path / "other.h5")
    captioner = Captioner.from_checkpoint(retrieval_run, "cpu", load_encoder=False, datastore=other)
    cache = feature_cache.read_cache(shapes_cache)
    embeddings = torch.from_numpy(cache.embeddings[:3])
    # The store holds copies of the images: with no ids known, each retrieves its own two.
    for r, found in enumerate(captioner.retrieve(embeddings)):
        assert all(c.endswith(f"of image {cache.image_ids[r]}") for c in found), found
    # evaluate retrieves from the swapped store too, and there never an image's own captions.
    evaluated = tmp_path / "eval"
    run_cli("evaluate", retrieval_run, "--features", shapes_cache, "--out", evaluated,
            "--no-bertscore", "--greedy", "--datastore", other, check=0)  # fmt: skip
    for entry in json.loads((evaluated / "predictions.json").read_text()):
        assert all(c.startswith("caption ") for c in entry["retrieved"])
        assert not any(c.endswith(f"of image {entry['image_id']}") for c in entry["retrieved"])


@pytest.mark.bad_input("message")
def test_a_datastore_of_captions_too_long_for_the_prompt_is_named(
    retrieval_run, shapes_cache, tmp_path
):
    # Swapped in at inference, a datastore of long captions makes a retrieval prompt longer than
    # the GPT-2's positions: one line that names the retrieval prompt, not --prompt.
    long = _copied_as_datastore(shapes_cache, tmp_path / "long.h5", tail=" and more" * 80)
    evaluated = tmp_path / "eval"
    result = run_cli("evaluate", retrieval_run, "--features", shapes_cache, "--out", evaluated,
                     "--no-bertscore", "--greedy", "--datastore", long)  # fmt: skip
    message = assert_one_line_error(result)
    assert "retrieval prompt" in message and "datastore of shorter captions" in message, message
    assert not (evaluated / "predictions.json").exists()


@pytest.mark.bad_input("bad option")
def test_a_datastore_of_another_clip_model_is_refused(
    shapes_cache, shapes_text, gpt2_dir, tmp_path
):
    other = tmp_path / "other_clip.h5"
    found = feature_cache.read_cache(shapes_text)
    with h5py.File(shapes_text, "r") as f:
        attrs = dict(f.attrs)
    feature_cache.write_cache(
        other,
        embeddings=found.embeddings,
        image_ids=found.image_ids,
        image_paths=found.image_paths,
        splits=found.splits.tolist(),
        captions=found.captions,
        caption_image_index=found.caption_image_index,
        failed_paths=[],
        failed_reasons=[],
        attrs={**attrs, "clip_model": "openai/clip-vit-large-patch14"},
    )
    out = tmp_path / "run"
    result = run_cli(
        *train_args(shapes_cache, out, gpt2_dir, "--retrieval", "2", "--datastore", other)
    )
    line = assert_one_line_error(result)
    assert "comes from CLIP model openai/clip-vit-large-patch14" in line
    assert not out.exists()


@pytest.mark.bad_input("bad option")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--retrieval", "2"], "--retrieval needs --datastore"),
        (["--retrieval", "2", "--datastore", "X", "--retrieval-template", "no slot"],
         "--retrieval-template must hold {captions}"),
        (["--retrieval", "2", "--datastore", "X", "--retrieval-template", "{captions} {x}"],
         "no other braces"),
        (["--datastore", "X"], "--datastore is used with --retrieval"),
        (["--noise-variance", "-1"], "--noise-variance must be at least 0"),
    ],
)  # fmt: skip
def test_bad_retrieval_options_are_refused(shapes_cache, gpt2_dir, tmp_path, extra, message):
    result = run_cli(*train_args(shapes_cache, tmp_path / "run", gpt2_dir, *extra))
    assert message in assert_one_line_error(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.bad_input("message")
def test_an_image_cache_is_not_a_datastore(shapes_cache, gpt2_dir, tmp_path):
    args = train_args(shapes_cache, tmp_path / "run", gpt2_dir, "--retrieval", "2")
    result = run_cli(*args, "--datastore", shapes_cache)
    assert "not a datastore" in assert_one_line_error(result)


@pytest.mark.bad_input("bad option")
def test_a_datastore_for_a_plain_checkpoint_is_refused(checkpoint_run, shapes, shapes_text):
    _, root = shapes
    image = sorted((root / "images").glob("*.png"))[0]
    result = run_cli("caption", image, "--checkpoint", checkpoint_run, "--datastore", shapes_text)
    assert "trained without retrieval" in assert_one_line_error(result)


def test_with_every_block_frozen_only_the_projector_trains(
    shapes_cache, shapes_text, gpt2_dir, tmp_path
):
    out = tmp_path / "frozen"
    args = train_args(shapes_cache, out, gpt2_dir, "--retrieval", "2", "--datastore", shapes_text)
    run_cli(*args, "--freeze-layers", "2", "--epochs", "1", "--no-val", check=0)
    saved = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert saved and all(name.startswith("projector.") for name in saved)
    captioner = Captioner.from_checkpoint(out, "cpu", load_encoder=False)
    trainable, _ = count_parameters(captioner.model)
    assert trainable == sum(p.numel() for p in captioner.model.projector.parameters())


@pytest.mark.slow
def test_retrieval_with_noise_resumes_to_the_same_weights(
    shapes_cache, shapes_text, gpt2_dir, tmp_path
):
    extra = ["--retrieval", "2", "--datastore", shapes_text, "--noise-variance", "0.016"]
    extra += ["--no-val", "--epochs", "2"]
    reference = tmp_path / "reference"
    run_cli(*train_args(shapes_cache, reference, gpt2_dir, *extra), check=0)
    killed = tmp_path / "killed"
    args = train_args(shapes_cache, killed, gpt2_dir, *extra, "--save-every-steps", "1")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "checkpoints" / "last"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _saved_step(last) < 5:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_train_state(last)["epoch"] < 2, "the run finished before it could be killed"
    run_cli(*train_args(shapes_cache, killed, gpt2_dir, *extra, "--resume"), check=0)
    a = load_file(str(reference / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(last / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The noise is drawn: another variance trains to other weights.
    other = tmp_path / "other"
    run_cli(*train_args(shapes_cache, other, gpt2_dir, *extra[:5], "0.1", *extra[6:]), check=0)
    c = load_file(str(other / "checkpoints" / "last" / "model.safetensors"))
    assert not torch.equal(a["projector.net.0.weight"], c["projector.net.0.weight"])


@pytest.mark.slow
def test_two_processes_train_with_retrieval_like_one(
    shapes_cache, shapes_text, gpt2_no_dropout_dir, tmp_path
):
    from test_distributed import torchrun

    extra = ["--retrieval", "2", "--datastore", shapes_text, "--epochs", "1", "--no-val"]
    extra += ["--grad-accum", "2", "--save-every-steps", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(*train_args(shapes_cache, one, gpt2_no_dropout_dir, *extra), check=0)
    torchrun(*train_args(shapes_cache, two, gpt2_no_dropout_dir, *extra))
    a = load_file(str(one / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "last" / "model.safetensors"))
    for name in a:  # every rank retrieved the same prompts; sums differ only in their order
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=3e-5)
    saved = json.loads((two / "checkpoints" / "last" / "config.json").read_text())
    assert saved["retrieval"]["k"] == 2


@pytest.mark.bad_input("bad option")
def test_a_resume_with_other_retrieval_settings_is_refused(
    retrieval_run, shapes_cache, shapes_text, gpt2_dir
):
    args = train_args(shapes_cache, retrieval_run, gpt2_dir, "--datastore", shapes_text)
    result = run_cli(*args, "--retrieval", "3", "--resume", "--eval-images", "4")
    assert "--resume: the run was trained with --retrieval 2" in assert_one_line_error(result)


# ------------------------------------------------------------------ training from text alone


def test_a_text_only_run_normalises_and_captions_images(
    shapes_cache, shapes_text, gpt2_dir, tmp_path
):
    out = tmp_path / "text-only"
    args = train_args(shapes_text, out, gpt2_dir, "--noise-variance", "0.016", "--eval-images", "4")
    run_cli(*args, check=0)
    config = json.loads((out / "checkpoints" / "best" / "config.json").read_text())
    assert config["model"]["normalize_prefix"] is True
    assert config["trained_on"] == "text"
    # Validation ran on the text file's val captions.
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_loss" in row and "val_cider" in row
    # The image cache shares its CLIP model, so the text-trained model captions its images; an
    # image embedding and its scaled copy give the same captions, as inputs are normalised.
    captioner = Captioner.from_checkpoint(out, "cpu", load_encoder=False)
    embeddings = torch.from_numpy(feature_cache.read_cache(shapes_cache).embeddings[:4]).float()
    greedy = DecodeConfig(strategy="greedy")
    plain = captioner.caption_embeddings(embeddings, greedy)
    scaled = captioner.caption_embeddings(embeddings * 7.0, greedy)
    assert [c[0]["caption"] for c in plain] == [c[0]["caption"] for c in scaled]
    for a, b in zip(plain, scaled, strict=True):  # the normalisation rounds a little
        assert a[0]["score"] == pytest.approx(b[0]["score"], abs=1e-5)


def test_the_server_and_the_captioner_answer_with_what_they_retrieved(
    retrieval_run, shapes, shapes_cache, tmp_path
):
    from fastapi.testclient import TestClient

    from clipcap_cache.inference.serve import ServeConfig, create_app

    _, root = shapes
    paths = sorted((root / "images").glob("*.png"))[:2]
    other = _copied_as_datastore(shapes_cache, tmp_path / "copies.h5")
    captioner = Captioner.from_checkpoint(retrieval_run, "cpu", datastore=other)
    direct = captioner.caption(paths, DecodeConfig(strategy="greedy"))
    config = ServeConfig(str(retrieval_run), datastore=str(other))
    with TestClient(create_app(captioner, config), base_url="http://127.0.0.1") as client:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
        reply = client.post("/caption", files=files, data={"greedy": "true"})
    assert reply.status_code == 200
    for result, expected in zip(reply.json()["results"], direct, strict=True):
        assert result["retrieved"] == expected.retrieved
        assert len(result["retrieved"]) == 2
        assert all(c.startswith("caption ") for c in result["retrieved"])  # the swapped store
        assert [c["caption"] for c in result["captions"]] == expected.texts()


# ------------------------------------------------------------------ on the pretrained testbed


@pytest.fixture(scope="module")
def testbed_data(tmp_path_factory, shapes, pretrained_clip_dir):
    """The shapes cache made with the pretrained tiny CLIP, and its captions' text file."""
    annotations, root = shapes
    folder = tmp_path_factory.mktemp("testbed-data")
    features = extract_shapes(annotations, root, folder / "shapes.h5", pretrained_clip_dir)
    text = folder / "text.h5"
    text_embedding.embed_text(text_embedding.TextConfig(source=str(features), out=str(text)))
    return features, text


def _right_colour_and_shape(captions: list[str], references: list[str]) -> float:
    """The share of captions that name their reference's colour and shape (chance: 1/12)."""
    right = 0
    for caption, reference in zip(captions, references, strict=True):
        words, expected = caption.split(), reference.split()
        colour = next(c for c in COLORS if c in expected)
        shape = next(s for s in SHAPES if s in expected)
        right += colour in words and shape in words
    return right / len(captions)


def test_retrieval_finds_captions_of_the_right_colour_and_shape(testbed_data):
    features, text = testbed_data
    cache = feature_cache.read_cache(features)
    rows = cache.rows_of_split("test")
    datastore = Datastore.open(text)
    ids = [cache.image_ids[r] for r in rows]
    best = datastore.captions(datastore.search(cache.embeddings[rows], 1, ids))
    references = [cache.references()[r][0] for r in rows]
    # Another image's caption, through CLIP's image-text agreement: far above the 1/12 of chance.
    assert _right_colour_and_shape([b[0] for b in best], references) >= 0.8


@pytest.mark.slow
def test_a_text_only_model_captions_test_images_with_the_right_colour_and_shape(
    testbed_data, pretrained_gpt2_dir, tmp_path
):
    from clipcap_cache.model import ModelConfig
    from clipcap_cache.training.config import TrainConfig
    from clipcap_cache.training.train import train

    features, text = testbed_data
    out = tmp_path / "text-only"
    train(
        TrainConfig(
            features=str(text),
            out=str(out),
            epochs=20,
            batch_size=16,
            lr=3e-3,
            warmup_steps=10,
            seed=0,
            device="cpu",
            validate=False,
            save_every_steps=0,
            noise_variance=0.016,  # CapDec's
        ),
        ModelConfig(gpt2_model=str(pretrained_gpt2_dir), prefix_length=4, freeze_layers=0),
    )
    # Not one image was seen in training: the test images are captioned from their CLIP image
    # embeddings, normalised as the text embeddings were.
    captioner = Captioner.from_checkpoint(out, "cpu", load_encoder=False)
    cache = feature_cache.read_cache(features)
    rows = cache.rows_of_split("test")
    found = captioner.caption_embeddings(
        torch.from_numpy(cache.embeddings[rows]), DecodeConfig(strategy="greedy")
    )
    references = [cache.references()[r][0] for r in rows]
    share = _right_colour_and_shape([f[0]["caption"] for f in found], references)
    assert share >= 0.6, share  # 0.83 measured, as paired training; chance is 1/12
