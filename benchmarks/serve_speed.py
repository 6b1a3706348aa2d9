"""`clipcap serve` under load: 16 concurrent clients against the same requests one at a time.

    python benchmarks/serve_speed.py [--clients 16] [--device cuda]

A real uvicorn server (the app of `clipcap serve`) on a checkpoint of ViT-B/32 and GPT-2 124M with
random weights, beam 5, 20 new tokens (random weights never emit EOS, so every caption is full
length). Each client posts one 640x480 JPEG. Reports:

- throughput: images/s with all clients at once, against the same requests sent one at a time
  (target: at least 3x);
- p95 latency under concurrency, against the time the model takes to caption all the clients'
  images as one batch, called directly (target: at most 2x).
"""

import argparse
import shutil
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn
from common import build_gpt2_124m, build_vit_b32, make_coco_images, save_result

from clipcap_cache import Captioner
from clipcap_cache.checkpoint import save_checkpoint
from clipcap_cache.hub import resolve_name
from clipcap_cache.inference.generate import decode_config
from clipcap_cache.inference.serve import ServeConfig, create_app
from clipcap_cache.model import ModelConfig, build_model, load_tokenizer

OPTIONS = {"beams": "5", "max_tokens": "20"}


def start_server(captioner, checkpoint: Path, clients: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(
        str(checkpoint), port=port, max_batch=clients, max_queue=4 * clients, max_images=clients
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(captioner, config), port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(url + "/health")
            return server, url
        except httpx.TransportError:
            time.sleep(0.05)


def post(url: str, name: str, data: bytes) -> float:
    """One request; returns its latency in seconds."""
    start = time.perf_counter()
    reply = httpx.post(
        url + "/caption", files={"images": (name, data, "image/jpeg")}, data=OPTIONS, timeout=600
    )
    reply.raise_for_status()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    clip_dir, gpt2_dir = build_vit_b32(work / "vit-b32"), build_gpt2_124m(work / "gpt2")
    torch.manual_seed(0)
    model = build_model(ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=512))
    checkpoint = work / "checkpoint"
    info = {"clip_model": resolve_name(str(clip_dir)), "embedding_dim": 512}
    save_checkpoint(checkpoint, model, load_tokenizer(str(gpt2_dir)), info)
    captioner = Captioner.from_checkpoint(checkpoint, args.device)
    make_coco_images(work / "images", args.clients)
    images = {p.name: p.read_bytes() for p in sorted((work / "images").glob("*.jpg"))}
    server, url = start_server(captioner, checkpoint, args.clients)

    # One batch of every client's image, straight through the model: the latency yardstick.
    pixels = torch.stack([captioner.preprocess(data) for data in images.values()])
    decode = decode_config(beams=5, max_tokens=20)
    captioner.caption_pixels(pixels[:2], decode)  # warm-up
    start = time.perf_counter()
    captioner.caption_pixels(pixels, decode)
    batch_seconds = time.perf_counter() - start

    start = time.perf_counter()
    sequential = [post(url, name, data) for name, data in images.items()]
    sequential_seconds = time.perf_counter() - start

    with ThreadPoolExecutor(args.clients) as pool:
        start = time.perf_counter()
        concurrent = list(pool.map(lambda item: post(url, *item), images.items()))
        concurrent_seconds = time.perf_counter() - start
    health = httpx.get(url + "/health").json()
    server.should_exit = True
    shutil.rmtree(work)

    p95 = statistics.quantiles(concurrent, n=20)[-1]
    n = len(images)
    save_result(
        "serve_speed",
        {
            "clients": n,
            "device": str(captioner.device),
            "one_batch_decode_s": round(batch_seconds, 2),
            "sequential_images_per_s": round(n / sequential_seconds, 3),
            "sequential_latency_median_s": round(statistics.median(sequential), 2),
            "concurrent_images_per_s": round(n / concurrent_seconds, 3),
            "concurrent_latency_p95_s": round(p95, 2),
            "throughput_ratio": round(sequential_seconds / concurrent_seconds, 2),
            "p95_over_one_batch": round(p95 / batch_seconds, 2),
            "model_calls": health["batches"],
        },
    )


if __name__ == "__main__":
    main()
