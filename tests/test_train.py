import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, assert_one_line_error, run_cli
from safetensors.torch import load_file

from clipcap_cache.checkpoint import load_checkpoint, load_train_state
from clipcap_cache.data.cache import read_cache, write_cache
from clipcap_cache.demo import COLORS
from clipcap_cache.errors import ClipcapError
from clipcap_cache.inference.generate import DecodeConfig, generate_captions
from clipcap_cache.model import IGNORE_INDEX, ModelConfig, build_model, load_tokenizer
from clipcap_cache.training.data import CaptionData


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


def colour_accuracy(checkpoint, cache_path) -> tuple[float, list]:
    """Share of test images whose greedy caption names the right colour; chance is 1/4."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    cache = read_cache(cache_path)
    test_rows = cache.rows_of_split("test")
    captions = generate_captions(
        model,
        tokenizer,
        torch.from_numpy(cache.embeddings[test_rows]),
        DecodeConfig(strategy="greedy", max_tokens=16),
    )
    references = cache.references()
    hits = [
        next((c for c in COLORS if c in references[row][0]), None) in caption[0].split()
        for caption, row in zip(captions, test_rows, strict=True)
    ]
    return float(np.mean(hits)), captions[:5]


def test_loss_falls_and_held_out_captions_beat_chance(trained_run, shapes_cache):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.3
    accuracy, captions = colour_accuracy(trained_run, shapes_cache)
    assert accuracy >= 0.6, (accuracy, captions)


@pytest.mark.slow
def test_transformer_projector_with_normalized_prefix_learns_the_task(
    tmp_path, shapes_cache, gpt2_dir
):
    out = tmp_path / "transformer"
    args = train_args(shapes_cache, out, gpt2_dir, "--epochs", "30", "--batch-size", "32")
    args[args.index("--warmup-steps") + 1] = "10"
    run_cli(
        *args,
        # The shapes captions' two templates differ in length, so grouped batches each hold one
        # template; measured with grouping: 0.46 (11 of 24) after these 300 steps.
        "--no-group-by-length",
        "--projector",
        "transformer",
        "--projector-layers",
        "2",
        "--projector-heads",
        "2",
        "--normalize-prefix",
        "--freeze-layers",
        "0",
        "--no-val",
        check=0,
    )
    model, _, config = load_checkpoint(out)
    assert config["model"]["projector"] == "transformer" and config["model"]["normalize_prefix"]
    assert type(model.projector).__name__ == "TransformerProjector"
    # Measured: 0.96 (23 of 24); chance is 0.25.
    accuracy, captions = colour_accuracy(out, shapes_cache)
    assert accuracy >= 0.75, (accuracy, captions)


@pytest.mark.parametrize("projector", ["mlp", "transformer"])
def test_normalize_prefix_makes_the_prefix_ignore_the_embedding_norm(gpt2_dir, projector):
    def prefix_of(normalize):
        torch.manual_seed(0)
        config = ModelConfig(
            gpt2_model=str(gpt2_dir),
            clip_embedding_dim=64,
            prefix_length=3,
            projector=projector,
            projector_layers=1,
            projector_heads=2,
            normalize_prefix=normalize,
        )
        model = build_model(config).eval()
        embeddings = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return model.prefix_embeddings(embeddings), model.prefix_embeddings(3 * embeddings)

    small, large = prefix_of(normalize=True)
    torch.testing.assert_close(small, large)
    small, large = prefix_of(normalize=False)
    # At init the transformer's constant tokens dominate its output, so the gap is small there.
    assert (small - large).abs().max() > 1e-2


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


def test_build_model_resolves_a_copy_of_its_config(gpt2_dir, monkeypatch):
    monkeypatch.chdir(gpt2_dir.parent)
    config = ModelConfig(gpt2_model=gpt2_dir.name, clip_embedding_dim=64, prefix_length=3)
    before = asdict(config)
    model = build_model(config)
    assert asdict(config) == before  # the caller's config is read, never written
    assert model.config.freeze_layers == model.gpt2.config.n_layer // 2 == 1
    assert model.config.gpt2_model == str(gpt2_dir.resolve())
    assert asdict(model.config) == {
        **before,
        "freeze_layers": 1,
        "gpt2_model": str(gpt2_dir.resolve()),
    }


def test_checkpoint_has_no_frozen_tensors_and_reloads_identically(gpt2_dir, tmp_path):
    from clipcap_cache.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            gpt2_model=str(gpt2_dir), clip_embedding_dim=64, prefix_length=4, freeze_layers=1
        )
    )
    tokenizer = load_tokenizer(str(gpt2_dir))
    save_checkpoint(
        tmp_path / "ckpt", model, tokenizer, {"embedding_dim": 64, "clip_model": "tiny-clip"}
    )
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
    # The tiny tokenizer's EOS is id 0 and doubles as padding, as GPT-2's does. A caption made of
    # token 0 must still be learned: the labels, not the ids, tell padding from caption.
    tokenizer = load_tokenizer(str(gpt2_dir))
    pad_id = tokenizer.eos_token_id
    assert pad_id == 0
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            gpt2_model=str(gpt2_dir), clip_embedding_dim=64, prefix_length=3, freeze_layers=0
        )
    ).eval()  # no dropout, so the losses below are exact
    data = CaptionData(
        embeddings=torch.randn(2, 64).numpy(),
        # caption 0: three 0 tokens and EOS (also 0); caption 1: tokens 7 and 9, then EOS
        token_ids=np.array([0, 0, 0, 0, 7, 9, 0], np.uint16),
        offsets=np.array([0, 4, 7]),
        caption_rows=np.array([0, 1]),
        captions=np.array([0, 1]),
    )
    embeds, ids, labels = data.batch(np.array([0, 1]), pad_id)
    assert ids.tolist() == [[0, 0, 0, 0], [7, 9, 0, pad_id]]
    assert labels.tolist() == [[0, 0, 0, 0], [7, 9, 0, IGNORE_INDEX]]
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
                F.cross_entropy(predicted[1, :3], ids[1, :3], reduction="none"),
            ]
        ).mean()
        torch.testing.assert_close(loss, manual)
        other_padding = ids.clone()
        other_padding[1, 3] = 5
        torch.testing.assert_close(model(embeds, other_padding, labels), loss)

    zeros = data.batch(np.array([0]), pad_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(60):
        loss = model(*zeros)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Measured: 5.11 -> 0.75. Were token 0 masked as padding, there would be nothing to learn.
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def _saved_step(last) -> int:
    """The step of a running job's last checkpoint, without touching its files; -1 if none yet.

    The file is read again only once it has changed, so the poll takes no CPU from the job.
    """
    path = last / "train_state.pt"
    try:
        stamp = path.stat().st_mtime_ns
        if _saved_step.seen[0] != (path, stamp):
            _saved_step.seen[:] = [(path, stamp), int(torch.load(path, weights_only=True)["step"])]
        return _saved_step.seen[1]
    except FileNotFoundError:  # not written yet, or mid-swap
        return -1


_saved_step.seen = [None, -1]


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
    last = resumed / "checkpoints" / "last"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _saved_step(last) < 5:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The kill may land between the two renames of a checkpoint swap; read the state the way
    # --resume does, which finishes such a swap first.
    killed_at = load_train_state(last)
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
    # Float summation order differs, so not bit-equal; but equal to float tolerance (Adam
    # magnifies rounding in near-zero gradients: 2.1e-5 at most after 20 steps, measured), and far
    # closer than the batch-4 run.
    for name in large:
        torch.testing.assert_close(accum[name], large[name], rtol=1e-3, atol=1e-4)
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
    assert "comes from CLIP model openai/clip-vit-large-patch14" in error


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


@pytest.fixture(scope="module")
def broken_caches(tmp_path_factory, shapes_cache):
    """Copies of the shapes cache, each broken in one way."""
    folder = tmp_path_factory.mktemp("broken")

    def variant(name, edit):
        path = folder / f"{name}.h5"
        path.write_bytes(shapes_cache.read_bytes())
        with h5py.File(path, "r+") as f:
            edit(f)
        return path

    def no_val(f):
        f["splits"][...] = np.array(["train"] * len(f["splits"]), dtype=object)

    def nan(f):
        f["embeddings"][...] = np.nan

    wide = folder / "wide.h5"
    with h5py.File(shapes_cache) as src, h5py.File(wide, "w") as dst:
        for name in src:
            data = src[name][()]
            dst.create_dataset(
                name, data=np.concatenate([data, data], 1) if name == "embeddings" else data
            )
        dst.attrs.update(dict(src.attrs))

    return {
        "incomplete": variant("incomplete", lambda f: f.attrs.__setitem__("complete", False)),
        "version": variant("version", lambda f: f.attrs.__setitem__("format_version", 99)),
        "no_val": variant("noval", no_val),
        "nan": variant("nan", nan),
        "wide": wide,
    }


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize(
    "cache, expected",
    [
        ("incomplete", "incomplete"),
        ("version", "format version 99"),
        ("no_val", "no val split"),
        ("nan", "hold NaN or inf"),
    ],
)
def test_a_bad_cache_is_refused_before_the_run_starts(
    tmp_path, gpt2_dir, broken_caches, cache, expected
):
    out = tmp_path / "run"
    assert expected in assert_one_line_error(
        run_cli(*train_args(broken_caches[cache], out, gpt2_dir))
    )
    assert not out.exists()


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, shapes_cache, gpt2_dir):
    out = tmp_path_factory.mktemp("runs") / "one-epoch"
    run_cli(*train_args(shapes_cache, out, gpt2_dir, "--epochs", "1"), check=0)
    return out


@pytest.mark.bad_input("data loss")
@pytest.mark.parametrize(
    "cache, extra, expected",
    [
        ("shapes", [], "--resume"),  # an existing run, with neither --resume nor --overwrite
        ("shapes", ["--resume", "--prefix-length", "5"], "prefix_length"),
        ("wide", ["--resume"], "128-d"),
        ("shapes", ["--resume", "--epochs", "2", "--lr", "1e-2"], "restores its optimizer"),
        ("shapes", ["--resume", "--epochs", "2", "--objective", "scst"], "--objective xe"),
        # The run was planned for 1 epoch; train_args says 2.
        ("shapes", ["--resume"], "--epochs 2 (was 1) would change it"),
        ("shapes", ["--resume", "--epochs", "1", "--warmup-steps", "7"], "--warmup-steps 7"),
        ("shapes", ["--replan-schedule"], "pass it with --resume"),
    ],
    ids=[
        "no-resume-flag",
        "other-model-config",
        "other-embedding-dim",
        "other-lr",
        "other-objective",
        "other-epochs",
        "other-warmup",
        "replan-without-resume",
    ],
)
def test_a_bad_resume_gets_one_line_and_leaves_the_run_alone(
    one_epoch_run, shapes_cache, gpt2_dir, broken_caches, cache, extra, expected
):
    features = shapes_cache if cache == "shapes" else broken_caches[cache]
    unchecked = {"train.log"}  # the log grows; nothing else may change

    def files():
        return {
            p
            for p in one_epoch_run.rglob("*")
            if p.is_file() and str(p.relative_to(one_epoch_run)) not in unchecked
        }

    snapshot = {p: p.read_bytes() for p in files()}
    error = assert_one_line_error(run_cli(*train_args(features, one_epoch_run, gpt2_dir, *extra)))
    assert expected in error
    assert files() == set(snapshot)
    for path, content in snapshot.items():
        assert path.read_bytes() == content, path
    assert (
        json.loads((one_epoch_run / "checkpoints" / "last" / "config.json").read_text())["epoch"]
        == 1
    )
    load_checkpoint(one_epoch_run / "checkpoints" / "last")


@pytest.mark.bad_input("data loss")
@pytest.mark.parametrize(
    "extra, expected",
    [
        # Each failed once after --overwrite had deleted the old run's checkpoints.
        (["--max-caption-tokens", "200"], "has 128; pass --max-caption-tokens 123 or less"),
        (["--seed", str(2**64 - 1)], "--seed must be less than 2**63"),
        (["--seed", "-1"], "--seed must be at least 0"),
        (["--objective", "scst", "--samples", str(10**20)], "--samples must be at most 1000"),
        (["--bertscore", "--bertscore-model", "no-such-scorer"], "bert-score does not know"),
        (["--objective", "scst", "--max-caption-tokens", "150"], "positions"),
    ],
    ids=["caption-tokens", "seed-2**64", "seed-negative", "samples", "bertscore", "scst-tokens"],
)
def test_a_failed_overwrite_leaves_the_old_run_as_it_was(
    tmp_path, one_epoch_run, shapes_cache, gpt2_dir, extra, expected
):
    victim = tmp_path / "victim"
    shutil.copytree(one_epoch_run, victim)
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    args = train_args(shapes_cache, victim, gpt2_dir, "--overwrite", *extra)
    assert expected in assert_one_line_error(run_cli(*args))
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


@pytest.mark.bad_input("data loss")
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("folder", ["model", "checkpoint"])
def test_out_that_is_not_a_run_is_never_taken_for_one(
    tmp_path, one_epoch_run, shapes_cache, gpt2_dir, folder, overwrite
):
    # A Hugging Face model folder and a checkpoint both hold a config.json.
    victim = tmp_path / folder
    shutil.copytree(
        gpt2_dir if folder == "model" else one_epoch_run / "checkpoints" / "best", victim
    )
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    args = train_args(shapes_cache, victim, gpt2_dir, *(["--overwrite"] if overwrite else []))
    error = assert_one_line_error(run_cli(*args))
    assert "holds files that are not a clipcap run (such as config.json)" in error
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


@pytest.mark.bad_input("silent wrong result")
def test_a_swapped_base_gpt2_of_the_same_shape_is_refused(
    tmp_path, one_epoch_run, shapes, shapes_cache, gpt2_dir
):
    from clipcap_cache.demo import all_demo_captions, build_tiny_gpt2

    # The checkpoint names a GPT-2 folder; the same weights there load, another model's do not.
    base = tmp_path / "base"
    shutil.copytree(gpt2_dir, base)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(one_epoch_run / "checkpoints" / "best", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["gpt2_model"] = str(base)
    (ckpt / "config.json").write_text(json.dumps(config))
    image = next((shapes[1] / "images").glob("*.png"))
    load_checkpoint(ckpt)

    shutil.rmtree(base)
    build_tiny_gpt2(base, all_demo_captions(), seed=7)  # same shape, other weights
    error = assert_one_line_error(
        run_cli("caption", image, "--checkpoint", ckpt, "--device", "cpu")
    )
    assert f"the GPT-2 at {base} is not the one the checkpoint {ckpt} was trained on" in error
    error = assert_one_line_error(
        run_cli(
            "train", shapes_cache, "--out", tmp_path / "init", "--init", ckpt, "--device", "cpu"
        )
    )
    assert "is not the one the --init checkpoint" in error
    assert not (tmp_path / "init").exists()


@pytest.mark.bad_input("message")
def test_a_vanished_local_base_model_is_named_as_a_folder_not_a_hub_name(tmp_path, one_epoch_run):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(one_epoch_run / "checkpoints" / "best", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["gpt2_model"] = str(tmp_path / "gone" / "gpt2")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClipcapError) as error:
        load_checkpoint(ckpt)
    message = str(error.value)
    assert f"the local folder {tmp_path / 'gone' / 'gpt2'} does not exist" in message
    assert "hf download" not in message and "hub" not in message


# Pinned: the per-epoch losses of a seeded two-epoch run of the tiny models on the shapes cache.
# They catch any change to batching, padding, the loss, the optimizer or the schedule. To
# regenerate, print the rows of the run's metrics.jsonl. Change them only with the reason in the
# commit message.
# The default groups batches by length; the plain shuffle's losses are pinned too.
PINNED_LOSSES = [
    {"train_loss": 5.104596150716146, "val_loss": 4.796247959136963},
    {"train_loss": 4.8375886535644534, "val_loss": 4.7285087903340655},
]
PINNED_UNGROUPED_LOSSES = [
    {"train_loss": 5.0218798828125, "val_loss": 4.718152205149333},
    {"train_loss": 4.740186767578125, "val_loss": 4.630547046661377},
]


@pytest.mark.parametrize(
    "extra, pins",
    [((), PINNED_LOSSES), (("--no-group-by-length",), PINNED_UNGROUPED_LOSSES)],
    ids=["grouped", "plain shuffle"],
)
def test_pinned_losses_of_a_seeded_run(tmp_path, shapes_cache, gpt2_dir, extra, pins):
    out = tmp_path / "run"
    run_cli(*train_args(shapes_cache, out, gpt2_dir, *extra), check=0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row, pinned in zip(rows, pins, strict=True):
        assert row["train_loss"] == pytest.approx(pinned["train_loss"], rel=1e-5)
        assert row["val_loss"] == pytest.approx(pinned["val_loss"], rel=1e-5)


def test_bf16_autocast_trains_on_the_cpu(tmp_path, shapes_cache, gpt2_dir):
    out = tmp_path / "bf16"
    run_cli(*train_args(shapes_cache, out, gpt2_dir, "--precision", "bf16"), check=0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row, fp32 in zip(rows, PINNED_LOSSES, strict=True):
        for key in ("train_loss", "val_loss"):
            assert np.isfinite(row[key])
            # bf16 rounds the forward pass: close to the fp32 run, and not equal to it, which
            # shows autocast was really on.
            assert row[key] == pytest.approx(fp32[key], rel=0.02)
            assert row[key] != pytest.approx(fp32[key], rel=1e-5)
    assert rows[1]["train_loss"] < rows[0]["train_loss"] - 0.1


class SimulatedCrash(Exception):
    """Raised right after a chosen checkpoint is saved, as a kill at that moment would stop a run."""


def crash_after_step(monkeypatch, step: int) -> None:
    """Make the next run stop right after it saves its resume point at optimizer step `step`."""
    from clipcap_cache import checkpoint

    real_save = checkpoint.save_checkpoint

    def save_then_crash(directory, model, tokenizer, info, train_state=None):
        real_save(directory, model, tokenizer, info, train_state)
        if train_state is not None and train_state["step"] == step:
            monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
            raise SimulatedCrash

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)


def library_run(out, features, gpt2_dir, monkeypatch, crash_at=None, **overrides):
    """One epoch through the library API, batches of 8, a resume point at every step.

    With warmup longer than the run, the learning rate depends only on the step count, so runs
    with other step totals still take the same learning rates step by step.
    """
    from clipcap_cache.training.config import TrainConfig
    from clipcap_cache.training.train import train

    settings = dict(
        features=str(features),
        out=str(out),
        epochs=1,
        batch_size=8,
        lr=3e-3,
        warmup_steps=10_000,
        seed=3,
        device="cpu",
        validate=False,
        save_every_steps=1,
    )
    config = TrainConfig(**{**settings, **overrides})
    model_config = ModelConfig(gpt2_model=str(gpt2_dir), prefix_length=4)
    if crash_at is None:
        return train(config, model_config)
    crash_after_step(monkeypatch, crash_at)
    with pytest.raises(SimulatedCrash):
        train(config, model_config)


def test_library_resume_in_the_middle_of_an_accumulation_group(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    # 320 captions in batches of 8. A run stopped after one step of --grad-accum 1 and resumed
    # with --grad-accum 2 starts at batch 1, in the middle of the group of batches 0-1: that
    # partial group must be weighted as a group of its own. The reference reaches batch 2 with
    # --grad-accum 1 and only then switches, at a group boundary, where no partial group exists.
    # The plain shuffle: a grouped epoch resumes only with its own batch size per step.
    def run(out, **kwargs):
        return library_run(
            out, shapes_cache, gpt2_dir, monkeypatch, group_by_length=False, **kwargs
        )

    mid_group = tmp_path / "mid-group"
    run(mid_group, grad_accum=1, crash_at=1)
    assert load_train_state(mid_group / "checkpoints" / "last")["batch"] == 1
    run(mid_group, grad_accum=2, resume=True, replan_schedule=True)

    aligned = tmp_path / "aligned"
    run(aligned, grad_accum=1, crash_at=1)
    run(aligned, grad_accum=1, resume=True, crash_at=2)
    assert load_train_state(aligned / "checkpoints" / "last")["batch"] == 2
    run(aligned, grad_accum=2, resume=True, replan_schedule=True)

    a = load_file(str(mid_group / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(aligned / "checkpoints" / "last" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (mid_group / "metrics.jsonl").open()]
    assert steps == [1 + 1 + 19]  # one step, the partial group, then 19 groups of 2


@pytest.mark.bad_input("data loss")
def test_resume_with_another_batch_size_starts_at_the_same_caption(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    def run(out, **kwargs):
        # The plain shuffle: a grouped epoch resumes only at its own batch size (test_batches).
        return library_run(
            out, shapes_cache, gpt2_dir, monkeypatch, group_by_length=False, **kwargs
        )

    # Stopped after 2 batches of 8 = 16 captions; batches of 16 resume at caption 16, so the
    # epoch takes 2 + (320 - 16) / 16 = 21 steps. Counting in batches would skip to caption 32.
    # Another batch size changes the schedule's step count, so it needs --replan-schedule.
    out = tmp_path / "divides"
    run(out, crash_at=2)
    with pytest.raises(ClipcapError, match="--batch-size 16 \\(was 8\\)"):
        run(out, batch_size=16, resume=True)
    assert run(out, batch_size=16, resume=True, replan_schedule=True)["step"] == 21
    assert load_train_state(out / "checkpoints" / "last")["schedule"]["total_steps"] == 21

    # Stopped after 8 captions, which batches of 16 cannot continue from exactly: refused.
    out = tmp_path / "does-not-divide"
    run(out, crash_at=1)
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(ClipcapError, match="not a whole number of batches of 16"):
        run(out, batch_size=16, resume=True, replan_schedule=True)
    after = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.bad_input("message")
def test_a_cache_changed_in_place_during_training_stops_it_with_one_line(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    from clipcap_cache.training import loop

    features = tmp_path / "f.h5"
    shutil.copy(shapes_cache, features)
    real_step = loop.train_micro_batch
    calls = {"n": 0}

    def step_then(change):
        def step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                change()
            return real_step(*args, **kwargs)

        return step

    def append_in_place():  # what a copy over the file does, short of its bus error
        with open(features, "ab") as f:
            f.write(b"\0" * 4096)

    monkeypatch.setattr(loop, "train_micro_batch", step_then(append_in_place))
    out = tmp_path / "changed"
    with pytest.raises(ClipcapError, match="f.h5 changed while training read it") as error:
        library_run(out, features, gpt2_dir, monkeypatch)
    assert "--resume" in str(error.value)
    assert load_train_state(out / "checkpoints" / "last")["step"] >= 2

    # A cache replaced by a rename leaves the mapped file as it was: the run goes on.
    calls["n"] = 0
    copy = tmp_path / "copy.h5"
    shutil.copy(shapes_cache, features)
    shutil.copy(shapes_cache, copy)
    monkeypatch.setattr(loop, "train_micro_batch", step_then(lambda: copy.replace(features)))
    assert library_run(tmp_path / "renamed", features, gpt2_dir, monkeypatch)["step"] == 40


def test_a_train_state_with_the_old_counter_names_resumes_bit_identically(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    # Train states written before the epoch counters were renamed call `samples_done`
    # "captions" and `weight_sum` "tokens"; such a run resumes as if it had never stopped.
    def run(out, **kwargs):
        return library_run(out, shapes_cache, gpt2_dir, monkeypatch, **kwargs)

    reference = run(tmp_path / "uninterrupted")
    old = tmp_path / "old-format"
    run(old, crash_at=3)
    path = old / "checkpoints" / "last" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    state["captions"], state["tokens"] = state.pop("samples_done"), state.pop("weight_sum")
    del state["schedule"]  # nor did they save their schedule: it is planned from the options
    assert state["captions"] == 3 * 8 and state["tokens"] > state["captions"]
    torch.save(state, path)

    resumed = run(old, resume=True)
    assert resumed["step"] == reference["step"] == 40
    assert resumed["train_loss"] == reference["train_loss"]
    a = load_file(str(tmp_path / "uninterrupted" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(old / "checkpoints" / "last" / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_replan_schedule_plans_the_decay_for_the_new_end(
    tmp_path, monkeypatch, shapes_cache, gpt2_dir
):
    # One epoch is 40 steps of 8 captions; warmup 2. Stopped at step 10 and resumed for 2 epochs
    # with --replan-schedule, the learning rate follows the decay that 2 epochs would have had
    # from the start: to zero at step 80 instead of 40.
    def run(out, **kwargs):
        return library_run(out, shapes_cache, gpt2_dir, monkeypatch, warmup_steps=2, **kwargs)

    out = tmp_path / "longer"
    run(out, crash_at=10)
    reached = load_train_state(out / "checkpoints" / "last")["optimizer"]["param_groups"][0]["lr"]
    assert reached == pytest.approx(3e-3 * (40 - 10) / (40 - 2))
    with pytest.raises(ClipcapError, match="--epochs 2 \\(was 1\\)"):
        run(out, epochs=2, resume=True)
    run(out, epochs=2, resume=True, replan_schedule=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [row["step"] for row in rows] == [40, 80]
    assert rows[0]["lr"] == pytest.approx(3e-3 * (80 - 40) / (80 - 2), rel=1e-6)
    assert rows[1]["lr"] == 0
    schedule = load_train_state(out / "checkpoints" / "last")["schedule"]
    assert schedule["total_steps"] == 80 and schedule["epochs"] == 2

    # A finished run trains longer the same way.
    run(out, epochs=3, resume=True, replan_schedule=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [row["step"] for row in rows] == [40, 80, 120] and rows[2]["lr"] == 0


@pytest.mark.bad_input("data loss")
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, shapes_cache, gpt2_dir
):
    # An absurd learning rate makes the weights overflow after the first step.
    out = tmp_path / "run"
    args = train_args(shapes_cache, out, gpt2_dir, "--lr", "1e38", "--save-every-steps", "1")
    error = assert_one_line_error(run_cli(*args, "--no-val"))
    assert "the loss became nan" in error or "the loss became inf" in error
    assert f"last good checkpoint is kept in {out / 'checkpoints' / 'last'}" in error
    assert load_train_state(out / "checkpoints" / "last")["step"] == 1
    model, _, _ = load_checkpoint(out / "checkpoints" / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_starts_a_new_run_from_a_trained_checkpoint(tmp_path, shapes_cache, trained_run):
    # No model flags: the checkpoint's model (its GPT-2, prefix length, frozen blocks) is used.
    out = tmp_path / "from-init"
    run_cli(
        "train",
        shapes_cache,
        "--out",
        out,
        "--init",
        trained_run,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "1e-6",
        "--warmup-steps",
        "0",
        "--device",
        "cpu",
        "--no-bertscore",
        "--seed",
        "0",
        check=0,
    )
    first = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[0])
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    row = json.loads((out / "metrics.jsonl").read_text())
    # With a tiny learning rate the new run starts where the trained one ended, far below the
    # loss of a first epoch from scratch.
    assert row["val_loss"] == pytest.approx(last["val_loss"], abs=0.02)
    assert row["train_loss"] < first["train_loss"] - 0.5
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["init"] == str(trained_run.resolve())
    assert saved["model"]["prefix_length"] == 4


@pytest.mark.bad_input("message")
def test_init_refuses_another_model(tmp_path, shapes_cache, trained_run, gpt2_dir):
    args = train_args(shapes_cache, tmp_path / "x", gpt2_dir, "--init", trained_run)
    args[args.index("--prefix-length") + 1] = "6"
    error = assert_one_line_error(run_cli(*args))
    assert "was trained with prefix_length=4, not 6" in error
    assert not (tmp_path / "x").exists()
