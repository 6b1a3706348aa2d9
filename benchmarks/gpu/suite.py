"""Every GPU benchmark and the CUDA tests in one run, for a short window on one GPU.

    bash benchmarks/gpu/run.sh [--smoke] OUT_DIR      # the way to run it
    PYTHONPATH=. python benchmarks/gpu/suite.py [--smoke] --out OUT_DIR

Builds ViT-B/32 and GPT-2 124M from their configs with random weights (nothing is downloaded),
COCO-sized JPEGs and synthetic feature caches, then measures one row per item below, prints one
table and writes it to OUT_DIR/results.json and OUT_DIR/results.md. A row that fails records
its error and the others still run; a row that would start after the time budget is skipped.

- extraction images/s, PIL decoding in workers and GPU JPEG decoding (`--decode gpu`), against
  the encoder alone on ready tensors;
- training captions/s at batch 40 through `clipcap train`'s loop, fp32, bf16 and bf16 with
  torch.compile, against a bare step (a fixed batch already on the device), and at the largest
  batch that fits; MFU against the GPU's bf16 peak; the projected time of one COCO Karpathy epoch;
- an SCST step (5 samples per image, CIDEr-D reward) and the reward's share of it;
- decoding images/s with beam 5;
- `clipcap serve` throughput with 16 concurrent clients against one at a time (skipped, with a
  note, without fastapi, uvicorn and httpx);
- the CUDA tests (`pytest -m cuda tests/test_cuda.py`), run first.

`--smoke` runs the same code on the CPU with the tiny models of `demo.py` and tiny sizes, in
about a minute, to show that the suite works before a GPU is at hand.
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/common.py and serve_speed.py

from common import (  # noqa: E402
    build_gpt2_124m,
    build_vit_b32,
    coco_like_captions,
    make_coco_images,
    write_synthetic_cache,
)

from clipcap_cache.hub import quiet_transformers  # noqa: E402

KARPATHY_TRAIN_CAPTIONS = 566_747  # COCO Karpathy train + restval captions
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}


@dataclass
class Sizes:
    """How big each measurement is; `--smoke` makes them all tiny."""

    extract_images: int = 1024
    extract_batch: int = 256
    workers: int = 8
    train_images: int = 2000  # x 5 captions
    batch: int = 40
    largest_batch_cap: int = 4096
    bare_steps: int = 30
    scst_images: int = 160
    scst_batch: int = 16
    decode_images: int = 256
    serve_clients: int = 16
    compile: bool = True
    budget_s: float = 480.0
    notes: list = field(default_factory=list)


SMOKE = Sizes(
    extract_images=8,
    extract_batch=4,
    workers=1,
    train_images=16,
    batch=40,
    largest_batch_cap=80,
    bare_steps=2,
    scst_images=8,
    scst_batch=4,
    decode_images=4,
    serve_clients=2,
    compile=False,
    budget_s=float("inf"),  # every row runs, however slow the machine: it is a check of the code
)


@dataclass
class Env:
    """What every row needs: the device, the models and the data, made once."""

    device: torch.device
    smoke: bool
    work: Path
    clip_dir: Path
    gpt2_dir: Path
    embedding_dim: int
    images: Path
    annotations: Path
    cache: Path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def setup(smoke: bool, device: torch.device, sizes: Sizes, work: Path) -> Env:
    if smoke:
        from clipcap_cache.demo import build_tiny_clip, build_tiny_gpt2

        clip_dir = build_tiny_clip(work / "clip")
        gpt2_dir = build_tiny_gpt2(work / "gpt2", coco_like_captions(200))
        embedding_dim = 64
    else:
        clip_dir, gpt2_dir = build_vit_b32(work / "vit-b32"), build_gpt2_124m(work / "gpt2")
        embedding_dim = 512
    annotations = make_coco_images(work / "images", sizes.extract_images)
    cache = work / "train.h5"
    write_synthetic_cache(cache, sizes.train_images)
    return Env(
        device, smoke, work, clip_dir, gpt2_dir, embedding_dim, work / "images", annotations, cache
    )


def caption_model(env: Env, clip_embedding_dim: int = 512):
    from clipcap_cache.model import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(gpt2_model=str(env.gpt2_dir), clip_embedding_dim=clip_embedding_dim)
    return build_model(config).to(env.device)


# Rows -------------------------------------------------------------------------------------------


def row_extraction(env: Env, sizes: Sizes) -> list[dict]:
    from clipcap_cache.extraction.encoder import load_clip
    from clipcap_cache.extraction.features import FeatureConfig, extract_features

    encoder = load_clip(str(env.clip_dir), env.device)
    size = encoder.processor.crop_size["height"]
    pixels = torch.randn(sizes.extract_batch, 3, size, size)
    encoder.encode(pixels)  # warm-up
    sync(env.device)
    batches = max(1, sizes.extract_images // sizes.extract_batch)
    start = time.perf_counter()
    for _ in range(batches):
        encoder.encode(pixels)
    sync(env.device)
    limit = batches * sizes.extract_batch / (time.perf_counter() - start)
    del encoder

    def extract(out: Path, decode: str) -> float:
        config = FeatureConfig(
            annotations=str(env.annotations),
            images=str(env.images),
            out=str(out),
            clip_model=str(env.clip_dir),
            batch_size=sizes.extract_batch,
            num_workers=sizes.workers,
            device=env.device.type,
            decode=decode,
        )
        start = time.perf_counter()
        summary = extract_features(config)
        return summary.images_written / (time.perf_counter() - start)

    extract(env.work / "warm.h5", "cpu")  # model load, worker start-up and page cache, once
    pipeline = extract(env.work / "features.h5", "cpu")
    # --decode gpu needs CUDA; the smoke run times the same call with auto, which decodes on the
    # CPU there, so that the row's code still runs.
    on_gpu = env.device.type == "cuda"
    gpu_decoding = extract(env.work / "gpu-decoded.h5", "gpu" if on_gpu else "auto")
    return [
        {
            "row": "extraction, PIL decoding in workers",
            "value": round(pipeline, 1),
            "unit": "images/s",
            "baseline": "encoder alone on ready tensors",
            "baseline_value": round(limit, 1),
            "ratio": round(pipeline / limit, 3),
        },
        {
            "row": "extraction, GPU JPEG decoding (--decode gpu)",
            "value": round(gpu_decoding, 1),
            "unit": "images/s",
            "baseline": "encoder alone on ready tensors",
            "baseline_value": round(limit, 1),
            "ratio": round(gpu_decoding / limit, 3),
            **({} if on_gpu else {"note": "smoke: --decode auto, CPU decoding"}),
        },
    ]


def step_flops_per_token(model) -> float:
    """Model FLOPs per processed token of a training step (attention's T^2 term left out).

    Forward: 2 per weight of the blocks and of the head. Backward: 4 per trainable weight
    (activation and weight gradients) and 2 per frozen weight that the gradient passes through on
    its way down to the projector (the frozen blocks and the head; GPT-2's embeddings are not on
    that path).
    """
    gpt2 = model.gpt2
    blocks = [p for block in gpt2.transformer.h for p in block.parameters()]
    trainable = sum(p.numel() for p in blocks if p.requires_grad)
    frozen = sum(p.numel() for p in blocks if not p.requires_grad)
    head = gpt2.lm_head.weight.numel()
    return 2 * (trainable + frozen + head) + 4 * trainable + 2 * (frozen + head)


def bf16_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def bare_step_rate(env: Env, precision: str, batch: int, steps: int) -> tuple[float, float]:
    """Captions/s and processed tokens/s of forward, backward and AdamW on one fixed batch."""
    from clipcap_cache.devices import autocast_dtype
    from clipcap_cache.training.config import TrainConfig
    from clipcap_cache.training.objectives import forward_backward
    from clipcap_cache.training.optimization import make_optimization

    model = caption_model(env).train()
    amp = autocast_dtype(precision, env.device)
    config = TrainConfig(features="", out="", batch_size=batch)
    optimization = make_optimization(model, config, env.device, steps + 2, amp)
    vocab = model.gpt2.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = 14  # a typical COCO caption and its EOS, in GPT-2 tokens
    embeddings = torch.randn(batch, 512, generator=generator).to(env.device)
    input_ids = torch.randint(0, vocab, (batch, tokens), generator=generator).to(env.device)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            sync(env.device)
            start = time.perf_counter()
        forward_backward(model, embeddings, input_ids, input_ids, 1.0, optimization.scaler, amp)
        optimization.step()
    sync(env.device)
    seconds = time.perf_counter() - start
    processed = batch * (tokens + model.config.prefix_length) * steps
    return batch * steps / seconds, processed * step_flops_per_token(model) / seconds


def loop_rate(env: Env, precision: str, batch: int, compile: bool) -> float:
    """Captions/s of one epoch of `clipcap train`'s own loop on the synthetic cache."""
    from clipcap_cache.model import ModelConfig
    from clipcap_cache.training.config import TrainConfig
    from clipcap_cache.training.train import train

    name = f"run-{precision}-{batch}-{'compiled' if compile else 'eager'}"
    config = TrainConfig(
        features=str(env.cache),
        out=str(env.work / name),
        epochs=1,
        batch_size=batch,
        device=env.device.type,
        precision=precision,
        validate=False,
        save_every_steps=0,
        compile=compile,
        overwrite=True,
    )
    row = train(config, ModelConfig(gpt2_model=str(env.gpt2_dir), clip_embedding_dim=512))
    return row["captions_per_second"]


def largest_batch(env: Env, sizes: Sizes) -> int:
    """The largest power-of-two multiple of the batch whose bf16 step fits in memory."""
    fits, batch = sizes.batch, sizes.batch * 2
    precision = "bf16" if env.device.type == "cuda" else "fp32"
    while batch <= sizes.largest_batch_cap:
        try:
            bare_step_rate(env, precision, batch, 1)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
        fits, batch = batch, batch * 2
    return fits


def row_training(env: Env, sizes: Sizes) -> list[dict]:
    rows, peak = [], bf16_peak()
    precisions = ["fp32", "bf16"] if env.device.type == "cuda" else ["fp32"]
    best = 0.0
    for precision in precisions:
        bare, flops = bare_step_rate(env, precision, sizes.batch, sizes.bare_steps)
        loop = loop_rate(env, precision, sizes.batch, compile=False)
        best = max(best, loop)
        rows.append(
            {
                "row": f"training, batch {sizes.batch}, {precision}",
                "value": round(loop, 1),
                "unit": "captions/s",
                "baseline": "bare step, fixed batch on the device",
                "baseline_value": round(bare, 1),
                "ratio": round(loop / bare, 3),
                "mfu": round(flops / peak, 4) if peak and precision == "bf16" else None,
            }
        )
    if sizes.compile and env.device.type == "cuda":
        loop = loop_rate(env, "bf16", sizes.batch, compile=True)
        best = max(best, loop)
        rows.append(
            {
                "row": f"training, batch {sizes.batch}, bf16 + torch.compile",
                "value": round(loop, 1),
                "unit": "captions/s",
                "baseline": "the same, eager",
                "baseline_value": rows[-1]["value"],
                "ratio": round(loop / rows[-1]["value"], 3),
                "note": "first-epoch figure: compilation time included",
            }
        )
    else:
        rows.append({"row": "training, bf16 + torch.compile", "note": "skipped (CPU or --smoke)"})
    largest = largest_batch(env, sizes)
    precision = "bf16" if env.device.type == "cuda" else "fp32"
    bare, flops = bare_step_rate(env, precision, largest, max(2, sizes.bare_steps // 3))
    rows.append(
        {
            "row": f"training, largest batch that fits ({largest}), {precision}, bare step",
            "value": round(bare, 1),
            "unit": "captions/s",
            "mfu": round(flops / peak, 4) if peak and precision == "bf16" else None,
            "note": f"searched by doubling up to {sizes.largest_batch_cap}",
        }
    )
    rows.append(
        {
            "row": "projected COCO Karpathy epoch (566,747 captions)",
            "value": round(KARPATHY_TRAIN_CAPTIONS / best / 60, 1),
            "unit": "minutes",
            "note": f"at the best batch-{sizes.batch} loop rate, {best:.1f} captions/s",
        }
    )
    return rows


def row_scst(env: Env, sizes: Sizes) -> list[dict]:
    from clipcap_cache.model import ModelConfig
    from clipcap_cache.training import scst
    from clipcap_cache.training.config import TrainConfig
    from clipcap_cache.training.train import train

    cache = env.work / "scst.h5"
    write_synthetic_cache(cache, sizes.scst_images)
    spent = {"reward": 0.0}
    real_call = scst.Reward.__call__

    def timed_reward(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return real_call(self, *args, **kwargs)
        finally:
            spent["reward"] += time.perf_counter() - start

    config = TrainConfig(
        features=str(cache),
        out=str(env.work / "scst-run"),
        epochs=1,
        batch_size=sizes.scst_batch,
        device=env.device.type,
        objective="scst",
        samples=5,
        validate=False,
        save_every_steps=0,
        max_caption_tokens=20,
        overwrite=True,
    )
    scst.Reward.__call__ = timed_reward
    try:
        row = train(config, ModelConfig(gpt2_model=str(env.gpt2_dir), clip_embedding_dim=512))
    finally:
        scst.Reward.__call__ = real_call
    return [
        {
            "row": f"SCST step, {sizes.scst_batch} images x 5 samples, CIDEr-D reward",
            "value": row["images_per_second"],
            "unit": "images/s",
            "reward_share": round(spent["reward"] / row["seconds"], 4),
            "note": "random weights sample to the 20-token limit: the longest step",
        }
    ]


def row_decoding(env: Env, sizes: Sizes) -> list[dict]:
    from clipcap_cache.devices import inference_autocast
    from clipcap_cache.inference.generate import decode_config, generate_captions
    from clipcap_cache.model import load_tokenizer

    model = caption_model(env).eval()
    tokenizer = load_tokenizer(str(env.gpt2_dir))
    embeddings = torch.randn(sizes.decode_images, 512)
    decode = decode_config(beams=5, max_tokens=20)
    autocast = inference_autocast(env.device)
    generate_captions(model, tokenizer, embeddings[:2], decode, autocast=autocast)  # warm-up
    sync(env.device)
    start = time.perf_counter()
    generate_captions(model, tokenizer, embeddings, decode, batch_size=64, autocast=autocast)
    sync(env.device)
    rate = sizes.decode_images / (time.perf_counter() - start)
    return [
        {
            "row": "decoding, beam 5, 20 tokens, batch 64",
            "value": round(rate, 1),
            "unit": "images/s",
            "note": "from cached embeddings; random weights never emit EOS",
        }
    ]


def row_serving(env: Env, sizes: Sizes) -> list[dict]:
    missing = [m for m in ("fastapi", "uvicorn", "httpx", "multipart") if not _importable(m)]
    if missing:
        return [{"row": "clipcap serve, concurrent clients", "note": f"skipped: no {missing}"}]
    from concurrent.futures import ThreadPoolExecutor

    from serve_speed import post, start_server

    from clipcap_cache import Captioner
    from clipcap_cache.checkpoint import save_checkpoint
    from clipcap_cache.hub import resolve_name
    from clipcap_cache.model import load_tokenizer

    model = caption_model(env, env.embedding_dim).cpu()
    checkpoint = env.work / "checkpoint"
    info = {"clip_model": resolve_name(str(env.clip_dir)), "embedding_dim": env.embedding_dim}
    save_checkpoint(checkpoint, model, load_tokenizer(str(env.gpt2_dir)), info)
    captioner = Captioner.from_checkpoint(checkpoint, env.device)
    pictures = sorted(env.images.glob("*.jpg"))[: sizes.serve_clients]
    images = {p.name: p.read_bytes() for p in pictures}
    server, url = start_server(captioner, checkpoint, len(images))
    try:
        post(url, *next(iter(images.items())))  # warm-up
        start = time.perf_counter()
        for item in images.items():
            post(url, *item)
        one_at_a_time = time.perf_counter() - start
        with ThreadPoolExecutor(len(images)) as pool:
            start = time.perf_counter()
            list(pool.map(lambda item: post(url, *item), images.items()))
            concurrent = time.perf_counter() - start
    finally:
        server.should_exit = True
    return [
        {
            "row": f"clipcap serve, {len(images)} concurrent clients, beam 5",
            "value": round(len(images) / concurrent, 2),
            "unit": "images/s",
            "baseline": "the same requests one at a time",
            "baseline_value": round(len(images) / one_at_a_time, 2),
            "ratio": round(one_at_a_time / concurrent, 2),
        }
    ]


def row_cuda_tests(seconds: float, out: Path) -> list[dict]:
    """Run `pytest -m cuda tests/test_cuda.py`, its output in OUT_DIR/cuda_tests.log.

    Each test's outcome is read from its own line of the verbose output, so a run stopped by the
    time limit still reports the tests that finished.
    """
    command = [sys.executable, "-m", "pytest", "-v", "-rfE", "-m", "cuda", "tests/test_cuda.py"]
    command += ["-p", "no:cacheprovider"]
    log = out / "cuda_tests.log"
    start = time.perf_counter()
    timeout = max(seconds, 60) if math.isfinite(seconds) else None
    timed_out = False
    with log.open("w") as f:
        try:
            subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
    text = log.read_text()
    outcomes = re.findall(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M)
    counts = {
        kind: sum(1 for _, o in outcomes if o == kind)
        for kind in ("PASSED", "FAILED", "SKIPPED", "ERROR")
    }
    failures = [name for name, o in outcomes if o in ("FAILED", "ERROR")]
    note = f"failed: {', '.join(failures)}" if failures else ""
    if timed_out:
        note = f"failed: timed out after {timeout:.0f} s; {note}"
    return [
        {
            "row": "CUDA tests (pytest -m cuda)",
            "value": counts["PASSED"],
            "unit": "passed",
            "failed": counts["FAILED"] + counts["ERROR"],
            "skipped": counts["SKIPPED"],
            "seconds": round(time.perf_counter() - start, 1),
            "note": (note + f" (log: {log.name})").strip(),
        }
    ]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# Output -----------------------------------------------------------------------------------------


def markdown(rows: list[dict], machine: str) -> str:
    def cell(value):
        return "" if value is None else str(value)

    lines = [
        f"**Machine:** {machine}",
        "",
        "| what | value | unit | baseline | baseline value | ratio | more |",
        "|---|---|---|---|---|---|---|",
    ]
    main = ("row", "value", "unit", "baseline", "baseline_value", "ratio")
    for row in rows:
        more = "; ".join(f"{k}: {v}" for k, v in row.items() if k not in main and v is not None)
        lines.append("| " + " | ".join([*(cell(row.get(k)) for k in main), more]) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, about a minute")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 480)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else Sizes()
    budget = args.budget or sizes.budget_s
    started = time.monotonic()
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("error: no CUDA GPU; use --smoke to try the suite on the CPU")
    from common import machine

    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="clipcap-gpu-suite-"))
    # The CUDA tests first, with at most 40% of the budget: in a short GPU window, whether the
    # GPU paths work matters more than how fast they are.
    rows.extend(row_cuda_tests(budget * 0.4, args.out))
    with quiet_transformers(), contextlib.redirect_stdout(sys.stderr):
        setup_started = time.monotonic()
        env = setup(args.smoke, device, sizes, work)
        rows.append(
            {
                "row": "setup (models, images, caches)",
                "value": round(time.monotonic() - setup_started, 1),
                "unit": "s",
            }
        )
        for step in (row_extraction, row_training, row_scst, row_decoding, row_serving):
            if time.monotonic() - started > budget:
                rows.append({"row": step.__name__, "note": "skipped: time budget spent"})
                continue
            try:
                rows.extend(step(env, sizes))
            except Exception as error:  # one failed row must not lose the others
                traceback.print_exc()
                rows.append(
                    {"row": step.__name__, "note": f"failed: {type(error).__name__}: {error}"[:300]}
                )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - started
    rows.append(
        {
            "row": "whole suite",
            "value": round(total, 1),
            "unit": "s",
            "note": f"budget {budget:.0f} s",
        }
    )
    result = {"machine": machine(), "smoke": args.smoke, "rows": rows}
    write_atomic(args.out / "results.json", json.dumps(result, indent=2) + "\n")
    table = markdown(rows, result["machine"])
    write_atomic(args.out / "results.md", table)
    print(table)
    failed = [r for r in rows if str(r.get("note", "")).startswith("failed") or r.get("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
