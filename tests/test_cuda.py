"""The GPU paths: half-precision extraction and training, torch.compile, decoding, serving, SCST
and NCCL, each against its fp32 or CPU counterpart.

Every test is marked `cuda` and skips without a CUDA GPU (`pytest -m cuda` selects them); the
torchrun tests also skip with fewer than two GPUs. They use the tiny models of `demo.py` through
the fixtures of conftest.py, so the whole file takes about a minute on one GPU.
"""

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_train import train_args

from clipcap_cache.checkpoint import load_checkpoint, resolve
from clipcap_cache.data.cache import read_cache
from clipcap_cache.extraction.features import FeatureConfig, extract_features
from clipcap_cache.inference.generate import DecodeConfig, generate_captions

DEVICE = "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
    ),
]
two_gpus = pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)


def on_device(args: list) -> list:
    """`train_args` with `--device DEVICE` instead of cpu."""
    args = list(args)
    args[args.index("--device") + 1] = DEVICE
    return args


def weights(run):
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def distance(a: dict, b: dict) -> float:
    return float(sum((a[k].float() - b[k].float()).norm() ** 2 for k in a) ** 0.5)


def test_fp16_extraction_equals_fp32(tmp_path, shapes, clip_dir, shapes_cache):
    # On CUDA, CLIP runs in fp16 (devices.inference_dtype); the shapes cache was made on the CPU
    # in fp32. Both store float16 rows.
    annotations, root = shapes
    out = tmp_path / "cuda.h5"
    summary = extract_features(
        FeatureConfig(
            annotations=str(annotations),
            images=str(root),
            out=str(out),
            clip_model=str(clip_dir),
            batch_size=64,
            num_workers=2,
            device=DEVICE,
        )
    )
    assert summary.images_failed == 0
    with h5py.File(out) as half, h5py.File(shapes_cache) as full:
        a = torch.from_numpy(half["embeddings"][:].astype(np.float32))
        b = torch.from_numpy(full["embeddings"][:].astype(np.float32))
        assert a.shape == b.shape
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cosine.min() >= 0.999, cosine.min()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_tracks_fp32(
    tmp_path, shapes_cache, gpt2_no_dropout_dir, precision
):
    # 2 epochs of 10 steps (320 captions in batches of 32). fp16 runs with the GradScaler.
    def run(name, precision):
        out = tmp_path / name
        args = train_args(shapes_cache, out, gpt2_no_dropout_dir, "--batch-size", "32")
        run_cli(*on_device(args), "--precision", precision, "--no-val", check=0)
        return out

    fp32, half = run("fp32", "fp32"), run(precision, precision)
    fp32_rows, half_rows = rows(fp32), rows(half)
    assert half_rows[1]["train_loss"] < half_rows[0]["train_loss"] - 0.1  # it learns
    for a, b in zip(half_rows, fp32_rows, strict=True):
        # Half precision rounds the forward pass: within 2% of fp32 (the bound the CPU bf16 test
        # holds in test_train.py), and not equal, which shows autocast was on.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02)
        assert a["train_loss"] != pytest.approx(b["train_loss"], rel=1e-6)
    state = torch.load(half / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    scale = state["scaler"].get("scale")
    if precision == "fp16":
        assert scale is not None and scale > 0  # the scaler was enabled and stepped
    else:
        assert scale is None  # bf16 needs no loss scaling


def test_compile_follows_eager(tmp_path, shapes_cache, gpt2_no_dropout_dir):
    def run(name, *extra):
        out = tmp_path / name
        args = train_args(shapes_cache, out, gpt2_no_dropout_dir, "--epochs", "1", *extra)
        run_cli(*on_device(args), "--precision", "fp32", "--no-val", check=0)
        return out

    eager, compiled, other = run("eager"), run("compiled", "--compile"), run("other", "--seed", "4")
    a, b, c = weights(eager), weights(compiled), weights(other)
    assert set(a) == set(b)
    # Compiled kernels round differently: not bit-equal, but far closer than another seed.
    assert distance(a, b) < 0.01 * distance(a, c)
    assert rows(compiled)[0]["train_loss"] == pytest.approx(rows(eager)[0]["train_loss"], rel=1e-3)


def test_greedy_captions_on_cuda_equal_those_on_the_cpu(trained_run, shapes_cache):
    cache = read_cache(shapes_cache)
    embeddings = torch.from_numpy(cache.embeddings[cache.rows_of_split("test")])
    decode = DecodeConfig(strategy="greedy", max_tokens=16)

    def captions(device, autocast):
        model, tokenizer, _ = load_checkpoint(resolve(trained_run), torch.device(device))
        return generate_captions(model, tokenizer, embeddings, decode, autocast=autocast)

    cpu = captions("cpu", None)
    assert captions(DEVICE, None) == cpu  # fp32 on both: the same argmax at every step
    # Inference on a GPU runs under fp16 autocast (devices.inference_autocast); a near-tie may
    # flip a token there, so most captions, not all, must be equal.
    half = captions(DEVICE, torch.float16 if DEVICE == "cuda" else None)
    same = np.mean([a == b for a, b in zip(half, cpu, strict=True)])
    assert same >= 0.9, same


def test_captioner_and_serve_on_cuda(trained_run, shapes, captioner):
    from clipcap_cache import Captioner

    _, root = shapes
    paths = sorted((root / "images").iterdir())[:8]
    on_gpu = Captioner.from_checkpoint(trained_run, device=DEVICE)
    assert on_gpu.device.type == DEVICE
    assert on_gpu.encoder.dtype == (torch.float16 if DEVICE == "cuda" else torch.float32)
    gpu_captions = on_gpu([str(p) for p in paths], beams=3)
    cpu_captions = captioner([str(p) for p in paths], beams=3)
    same = np.mean(
        [
            a[0]["caption"] == b[0]["caption"]
            for a, b in zip(gpu_captions, cpu_captions, strict=True)
        ]
    )
    assert same >= 0.75, (gpu_captions, cpu_captions)

    pytest.importorskip("fastapi", reason="clipcap serve needs fastapi")
    from fastapi.testclient import TestClient

    from clipcap_cache.inference.serve import ServeConfig, create_app

    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    app = create_app(on_gpu, ServeConfig(str(trained_run)))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/health").json()["device"] == DEVICE
        reply = client.post("/caption", files=files, data={"beams": "3"})
    assert reply.status_code == 200
    served = [r["captions"][0]["caption"] for r in reply.json()["results"]]
    assert served == [c[0]["caption"] for c in gpu_captions]


def test_scst_steps_on_cuda(tmp_path, shapes_cache, trained_run):
    out = tmp_path / "scst"
    args = [
        "train",
        shapes_cache,
        "--out",
        out,
        "--init",
        trained_run,
        "--objective",
        "scst",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--lr",
        "3e-4",
        "--warmup-steps",
        "0",
        "--device",
        DEVICE,
        "--no-bertscore",
        "--eval-images",
        "8",
        "--seed",
        "0",
    ]
    run_cli(*args, check=0)
    row = rows(out)[0]
    assert row["step"] == 10  # 160 train images in batches of 16
    assert np.isfinite(row["train_loss"]) and row["reward"] > 0
    assert 1 < row["sample_length"] <= 40
    assert "val_cider" in row
    before = weights(trained_run)
    after = weights(out)
    assert distance(before, after) > 0  # the steps changed the weights


@two_gpus
def test_two_process_training_with_nccl_equals_one_process(
    tmp_path, shapes_cache, gpt2_no_dropout_dir
):
    from test_distributed import torchrun

    extra = ["--epochs", "1", "--grad-accum", "2", "--no-val", "--precision", "fp32"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(*on_device(train_args(shapes_cache, one, gpt2_no_dropout_dir, *extra)), check=0)
    result = torchrun(*on_device(train_args(shapes_cache, two, gpt2_no_dropout_dir, *extra)))
    assert "across 2 process(es)" in result.stderr
    a, b = weights(one), weights(two)
    for name in a:
        # NCCL sums in another order than one process (test_distributed.py's gloo bound).
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=3e-5)


@two_gpus
def test_two_process_extraction_with_nccl_equals_one_process(
    tmp_path, shapes, clip_dir, shapes_cache
):
    from test_distributed import shard_args, torchrun

    out = tmp_path / "two.h5"
    args = [*shard_args(shapes, clip_dir, out), "--device", DEVICE]
    torchrun(*args)
    with h5py.File(out) as two, h5py.File(shapes_cache) as one:
        assert list(two["image_ids"][:]) == list(one["image_ids"][:])
        a = torch.from_numpy(two["embeddings"][:].astype(np.float32))
        b = torch.from_numpy(one["embeddings"][:].astype(np.float32))
    assert torch.nn.functional.cosine_similarity(a, b, dim=1).min() >= 0.999


def test_gpu_decoding_matches_cpu_decoding(tmp_path, clip_dir):
    """`--decode gpu` (nvJPEG, tensor preprocessing on the GPU) against `--decode cpu`: the same
    rows and failures, embeddings within cosine 0.999; non-JPEGs take the CPU path."""
    from matplotlib import cbook
    from PIL import Image

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for i, size in enumerate([(512, 600), (640, 480), (150, 700), (90, 60), (1200, 200)]):
        photo.resize(size).save(root / f"{i}.jpg", quality=90)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(root / "rotated.jpg", exif=exif)
    photo.convert("L").save(root / "grey.jpg")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    photo.save(root / "photo.png")
    (root / "cut.jpg").write_bytes((root / "0.jpg").read_bytes()[:3000])
    for path in sorted(root.iterdir()):
        rows.append({"image": path.name, "caption": f"caption of {path.name}"})
    annotations = tmp_path / "data.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    caches = {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / f"{decode}.h5"
        extract_features(
            FeatureConfig(
                annotations=str(annotations),
                images=str(root),
                out=str(out),
                clip_model=str(clip_dir),
                batch_size=4,
                num_workers=2,
                device=DEVICE,
                decode=decode,
            )
        )
        caches[decode] = read_cache(out)
    cpu, gpu = caches["cpu"], caches["gpu"]
    assert gpu.image_paths == cpu.image_paths and len(cpu.image_paths) == len(rows) - 1
    assert gpu.failed_paths == cpu.failed_paths == ["cut.jpg"]
    a = torch.from_numpy(cpu.embeddings[:].astype(np.float32))
    b = torch.from_numpy(gpu.embeddings[:].astype(np.float32))
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cosine.min() >= 0.999, dict(zip(cpu.image_paths, cosine.tolist(), strict=True))
