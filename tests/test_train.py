import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, assert_one_line_error, run_cli
from safetensors.torch import load_file

from clipcap_cache.cache import read_cache, write_cache
from clipcap_cache.checkpoint import load_checkpoint
from clipcap_cache.demo import COLORS
from clipcap_cache.generate import DecodeConfig, generate_captions
from clipcap_cache.model import IGNORE_INDEX, ModelConfig, build_model


def train_args(cache, out, gpt2_dir, *extra):
    return [
        "train",
        cache,
        "--out",
        out,
        "--gpt2-model",
        gpt2_dir,
        "--prefix-length",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "5",
        "--device",
        "cpu",
        "--no-bertscore",
        "--seed",
        "3",
        *extra,
    ]


def test_loss_falls_and_held_out_captions_beat_chance(trained_run, shapes_cache):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.3
    model, tokenizer, _ = load_checkpoint(trained_run)
    cache = read_cache(shapes_cache)
    test_rows = cache.rows_of_split("test")
    captions = generate_captions(
        model,
        tokenizer,
        torch.from_numpy(cache.embeddings[test_rows]),
        DecodeConfig(strategy="greedy", max_tokens=16),
    )
    references = cache.references()
    # Chance of naming the right colour is 1/4 (four colours, drawn uniformly).
    hits = [
        next((c for c in COLORS if c in refs[0]), None) in caption[0].split()
        for caption, refs in zip(captions, [references[r] for r in test_rows], strict=True)
    ]
    assert np.mean(hits) >= 0.6, (np.mean(hits), captions[:5])


def test_run_directory_holds_everything(trained_run):
    for name in [
        "config.json",
        "train.log",
        "metrics.jsonl",
        "plots/loss.png",
        "checkpoints/best/model.safetensors",
        "checkpoints/best/config.json",
        "checkpoints/best/tokenizer.json",
        "checkpoints/last/train_state.pt",
    ]:
        assert (trained_run / name).is_file(), name
    row = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_loss", "val_loss", "lr", "seconds", "captions_per_second"} <= set(row)
    log = (trained_run / "train.log").read_text()
    assert "trainable" in log and "truncated" in log
    assert not list(trained_run.rglob("*.pkl"))


def test_exactly_the_intended_parameters_train(gpt2_dir):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            gpt2_model=str(gpt2_dir), clip_embedding_dim=64, prefix_length=3, freeze_layers=1
        )
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(
        n.startswith(("projector.", "gpt2.transformer.h.1.", "gpt2.transformer.ln_f."))
        for n in trainable
    )
    assert any(n.startswith("gpt2.transformer.h.1.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 50, (4, 6))
    model(torch.randn(4, 64), ids, ids).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert (not torch.equal(before[name], p)) == (name in trainable), name

    frozen_all = build_model(
        ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=64, freeze_layers=2)
    )
    assert all(
        n.startswith("projector.") for n, p in frozen_all.named_parameters() if p.requires_grad
    )


def test_checkpoint_has_no_frozen_tensors_and_reloads_identically(
    trained_run, shapes_cache, gpt2_dir, tmp_path
):
    from clipcap_cache.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            gpt2_model=str(gpt2_dir), clip_embedding_dim=64, prefix_length=4, freeze_layers=1
        )
    )
    tokenizer = load_checkpoint(trained_run)[1]
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, {"embedding_dim": 64})
    names = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(
        n.startswith(("gpt2.transformer.h.0.", "gpt2.transformer.wte", "gpt2.transformer.wpe"))
        for n in names
    )
    reloaded, _, config = load_checkpoint(tmp_path / "ckpt")
    assert config["model"]["freeze_layers"] == 1
    embeds, ids = torch.randn(3, 64), torch.randint(0, 50, (3, 5))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(embeds, ids, ids), reloaded(embeds, ids, ids))


def test_loss_covers_caption_and_eos_only_and_learns_token_zero(gpt2_dir):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=64, prefix_length=3)
    ).eval()
    embeds = torch.randn(2, 64)
    ids = torch.tensor(
        [[0, 0, 5, 0], [7, 0, 9, 9]]
    )  # row 0 is a caption of token 0s, row 1 is padded after 2
    labels = ids.clone()
    labels[1, 2:] = IGNORE_INDEX
    with torch.no_grad():
        loss = model(embeds, ids, labels)
        prefix = model.prefix_embeddings(embeds)
        logits = model.gpt2(
            inputs_embeds=torch.cat([prefix, model.gpt2.transformer.wte(ids)], 1)
        ).logits
        # Position K-1+t predicts token t; only labelled tokens count.
        predicted = logits[:, 2:-1]
        manual = torch.cat(
            [
                F.cross_entropy(predicted[0], ids[0], reduction="none"),
                F.cross_entropy(predicted[1, :2], ids[1, :2], reduction="none"),
            ]
        ).mean()
        torch.testing.assert_close(loss, manual)
        other_padding = ids.clone()
        other_padding[1, 2:] = 3
        torch.testing.assert_close(model(embeds, other_padding, labels), loss)
        only_zeros = model(embeds[:1], ids[:1, :2], labels[:1, :2])
        assert only_zeros > 0


def test_killed_run_resumes_to_the_same_weights(tmp_path, shapes_cache, gpt2_dir):
    reference = tmp_path / "reference"
    run_cli(*train_args(shapes_cache, reference, gpt2_dir, "--epochs", "3"), check=0)

    resumed = tmp_path / "resumed"
    args = train_args(shapes_cache, resumed, gpt2_dir, "--epochs", "3", "--save-every-steps", "1")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = resumed / "checkpoints" / "last" / "train_state.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 5:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(state, weights_only=True)
    assert killed_at["epoch"] < 3, "the run finished before it could be killed"

    run_cli(*train_args(shapes_cache, resumed, gpt2_dir, "--resume", "--epochs", "3"), check=0)
    a = load_file(str(reference / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last" / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


def _distance(a: dict, b: dict) -> float:
    return float(sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5)


def test_grad_accum_matches_one_large_batch(tmp_path, shapes_cache, gpt2_no_dropout_dir):
    # Without dropout, micro-batches of 4 accumulated 4 times see exactly what batches of 16 see.
    def run(name, batch_size, grad_accum):
        out = tmp_path / name
        args = ["--epochs", "1", "--no-val", "--batch-size", batch_size, "--grad-accum", grad_accum]
        run_cli(*train_args(shapes_cache, out, gpt2_no_dropout_dir, *args), check=0)
        step = json.loads((out / "metrics.jsonl").read_text())["step"]
        return step, load_file(str(out / "checkpoints" / "last" / "model.safetensors"))

    large_steps, large = run("large", 16, 1)
    accum_steps, accum = run("accum", 4, 4)
    small_steps, small = run("small", 4, 1)
    assert accum_steps == large_steps == small_steps // 4
    # Float summation order differs, so not bit-equal; but far closer than the batch-4 run.
    assert _distance(large, accum) < 0.01 * _distance(large, small)


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run(tmp_path, shapes_cache, gpt2_no_dropout_dir):
    def run(name, *extra):
        out = tmp_path / name
        args = train_args(shapes_cache, out, gpt2_no_dropout_dir, "--epochs", "1", *extra)
        run_cli(*args, "--no-val", check=0)
        return out, load_file(str(out / "checkpoints" / "last" / "model.safetensors"))

    _, eager = run("eager")
    out, compiled = run("compiled", "--compile")
    _, other_seed = run("other-seed", "--seed", "4")
    # Compiled kernels round differently, so not bit-equal; but far closer than another seed.
    assert _distance(eager, compiled) < 0.01 * _distance(eager, other_seed)
    # A compiled run saves plain parameter names, so its checkpoint loads into an eager model.
    assert set(compiled) == set(eager)
    load_checkpoint(out / "checkpoints" / "last")


def test_epoch_bertscore_equals_bert_score_on_the_val_captions(
    tmp_path, shapes_cache, gpt2_dir, minilm_dir
):
    import bert_score

    out = tmp_path / "run"
    args = train_args(shapes_cache, out, gpt2_dir, "--epochs", "1", "--eval-images", "8")
    args.remove("--no-bertscore")
    run_cli(*args, "--bertscore-model", minilm_dir, "--bertscore-layers", "6", check=0)
    row = json.loads((out / "metrics.jsonl").read_text())

    # The last checkpoint holds the weights the epoch's validation ran with.
    model, tokenizer, _ = load_checkpoint(out / "checkpoints" / "last")
    cache = read_cache(shapes_cache)
    rows = cache.rows_of_split("val")[:8]
    captions = generate_captions(
        model,
        tokenizer,
        torch.from_numpy(cache.embeddings[rows]).float(),
        DecodeConfig(strategy="greedy"),
    )
    references = cache.references()
    precision, recall, f1 = bert_score.score(
        [c[0] for c in captions],
        [references[r] for r in rows],
        model_type=minilm_dir,
        num_layers=6,
    )
    assert row["bertscore_precision"] == pytest.approx(precision.mean().item(), abs=1e-5)
    assert row["bertscore_recall"] == pytest.approx(recall.mean().item(), abs=1e-5)
    assert row["bertscore_f1"] == pytest.approx(f1.mean().item(), abs=1e-5)


def _val_images_only(source, path):
    """A cache of the val images of `source`, every one marked `test`."""
    cache = read_cache(source)
    rows = cache.rows_of_split("val")
    keep = np.flatnonzero(np.isin(cache.caption_image_index, rows))
    write_cache(
        path,
        embeddings=cache.embeddings[rows],
        image_ids=[cache.image_ids[r] for r in rows],
        image_paths=[cache.image_paths[r] for r in rows],
        splits=["test"] * len(rows),
        captions=[cache.captions[i] for i in keep],
        caption_image_index=np.searchsorted(rows, cache.caption_image_index[keep]),
        failed_paths=[],
        failed_reasons=[],
        attrs=cache.attrs,
    )
    return path


def test_val_features_validates_on_another_cache(tmp_path, shapes_cache, gpt2_dir):
    val_only = _val_images_only(shapes_cache, tmp_path / "val.h5")

    def val_loss(name, *extra):
        out = tmp_path / name
        run_cli(*train_args(shapes_cache, out, gpt2_dir, "--epochs", "1", *extra), check=0)
        return json.loads((out / "metrics.jsonl").read_text())["val_loss"]

    # The same images validated from either file give the same loss.
    assert val_loss("separate", "--val-features", val_only) == pytest.approx(
        val_loss("own-split"), rel=1e-6
    )

    other_clip = tmp_path / "other-clip.h5"
    other_clip.write_bytes(val_only.read_bytes())
    with h5py.File(other_clip, "r+") as f:
        f.attrs["clip_model"] = "openai/clip-vit-large-patch14"
    error = assert_one_line_error(
        run_cli(*train_args(shapes_cache, tmp_path / "bad", gpt2_dir, "--val-features", other_clip))
    )
    assert "another CLIP model" in error


def test_config_file_with_command_line_override(tmp_path, shapes_cache, gpt2_dir):
    config = tmp_path / "options.json"
    config.write_text(
        json.dumps(
            {
                "epochs": 5,
                "lr": 1e-3,
                "projector": "transformer",
                "projector_heads": 2,
                "projector_layers": 1,
            }
        )
    )
    out = tmp_path / "run"
    run_cli(*train_args(shapes_cache, out, gpt2_dir, "--config", config, "--no-val"), check=0)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 2  # the flag wins over the file
    assert saved["train"]["lr"] == 3e-3 and saved["model"]["projector"] == "transformer"
    assert saved["train"]["validate"] is False


@pytest.fixture
def broken_caches(tmp_path, shapes_cache):
    def variant(name, edit):
        path = tmp_path / name
        path.write_bytes(shapes_cache.read_bytes())
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    def no_val(f):
        f["splits"][...] = np.array(["train"] * len(f["splits"]), dtype=object)

    def nan(f):
        f["embeddings"][...] = np.nan

    return {
        "incomplete": variant("incomplete.h5", lambda f: f.attrs.__setitem__("complete", False)),
        "version": variant("version.h5", lambda f: f.attrs.__setitem__("format_version", 99)),
        "no_val": variant("noval.h5", no_val),
        "nan": variant("nan.h5", nan),
    }


def test_bad_inputs_get_one_line_errors_and_leave_files_alone(
    tmp_path, shapes_cache, gpt2_dir, broken_caches
):
    out = tmp_path / "run"
    assert "incomplete" in assert_one_line_error(
        run_cli(*train_args(broken_caches["incomplete"], out, gpt2_dir))
    )
    assert "format version 99" in assert_one_line_error(
        run_cli(*train_args(broken_caches["version"], out, gpt2_dir))
    )
    assert "no val split" in assert_one_line_error(
        run_cli(*train_args(broken_caches["no_val"], out, gpt2_dir))
    )
    assert not out.exists()

    run_cli(*train_args(shapes_cache, out, gpt2_dir, "--epochs", "1"), check=0)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "train.log"}
    assert "--resume" in assert_one_line_error(run_cli(*train_args(shapes_cache, out, gpt2_dir)))
    error = assert_one_line_error(
        run_cli(*train_args(shapes_cache, out, gpt2_dir, "--resume", "--prefix-length", "5"))
    )
    assert "prefix_length" in error

    other_dim = tmp_path / "wide.h5"
    with h5py.File(shapes_cache) as src, h5py.File(other_dim, "w") as dst:
        for name in src:
            data = src[name][()]
            dst.create_dataset(
                name, data=np.concatenate([data, data], 1) if name == "embeddings" else data
            )
        dst.attrs.update(dict(src.attrs))
    assert "128-d" in assert_one_line_error(
        run_cli(*train_args(other_dim, out, gpt2_dir, "--resume"))
    )
    for path, content in snapshot.items():
        assert path.read_bytes() == content, path

    error = assert_one_line_error(
        run_cli(*train_args(broken_caches["nan"], out, gpt2_dir, "--resume", "--epochs", "2"))
    )
    assert "nan" in error and "last good checkpoint" in error
    last = json.loads((out / "checkpoints" / "last" / "config.json").read_text())
    assert last["epoch"] == 1
    load_checkpoint(out / "checkpoints" / "last")
