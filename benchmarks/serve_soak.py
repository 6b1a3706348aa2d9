"""`clipcap serve` soaked: many clients sending large images for a while against a small queue.

    python benchmarks/serve_soak.py [--clients 64] [--seconds 60] [--image-mb 5] [--max-queue 8]

A real `clipcap serve` process (the command line, on the demo's tiny CLIP and GPT-2: the model is
not what is measured) takes uploads of incompressible PNGs of about `--image-mb` MB from
`--clients` threads, each posting in a loop until the time is up. The server's resident memory is
sampled from /proc every 0.25 s. Reports peak RSS, requests served, 503s (the queue was full),
other statuses (there should be none), p99 latency of the served requests, and the growth of the
mean RSS from the first to the last 10 s (target: flat within 10%). `tests/test_serve_limits.py`
runs a short version of the same soak.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def noise_png(megabytes: float, seed: int = 0) -> bytes:
    """A PNG of random pixels, which PNG cannot compress: about `megabytes` MB."""
    import io

    side = int((megabytes * 2**20 / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def tiny_checkpoint(work: Path) -> Path:
    """A checkpoint of the demo's tiny models with untrained projector weights."""
    from clipcap_cache.checkpoint import save_checkpoint
    from clipcap_cache.demo import all_demo_captions, build_tiny_clip, build_tiny_gpt2
    from clipcap_cache.hub import resolve_name
    from clipcap_cache.model import ModelConfig, build_model, load_tokenizer

    clip_dir = build_tiny_clip(work / "clip")
    gpt2_dir = build_tiny_gpt2(work / "gpt2", all_demo_captions())
    from transformers import CLIPConfig

    dim = CLIPConfig.from_pretrained(clip_dir).projection_dim
    model = build_model(ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=dim))
    checkpoint = work / "checkpoint"
    info = {"clip_model": resolve_name(str(clip_dir)), "embedding_dim": dim}
    save_checkpoint(checkpoint, model, load_tokenizer(str(gpt2_dir)), info)
    return checkpoint


def start_server(checkpoint: Path, max_queue: int, max_upload_mb: float) -> tuple:
    """`clipcap serve` in a process of its own; returns (process, url) once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, str(REPO / "cli.py"), "serve", "--checkpoint", str(checkpoint),
        "--port", str(port), "--device", "cpu", "--max-queue", str(max_queue),
        "--max-images", "1", "--max-upload-mb", str(max_upload_mb), "--batch-window-ms", "5",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.1)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def soak(url: str, pid: int, clients: int, seconds: float, image: bytes, window: float) -> dict:
    """Post `image` from `clients` threads for `seconds`; the server's memory and the outcomes."""
    statuses: Counter = Counter()
    latencies: list[float] = []
    samples: list[tuple[float, int]] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + seconds

    def client():
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                began = time.perf_counter()
                try:
                    status = http.post(
                        url + "/caption", files={"images": ("noise.png", image, "image/png")}
                    ).status_code
                except httpx.TransportError as e:
                    status = type(e).__name__
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(time.perf_counter() - began)
                if status == 503:
                    time.sleep(0.05)  # as a client honouring Retry-After would, briefly

    def sampler():
        while time.monotonic() < stop:
            samples.append((time.monotonic() - start, rss_bytes(pid)))
            time.sleep(0.25)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    threads.append(threading.Thread(target=sampler))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = [rss for t, rss in samples if t <= window]
    last = [rss for t, rss in samples if t >= seconds - window]
    growth = statistics.mean(last) / statistics.mean(first) - 1
    p99 = statistics.quantiles(latencies, n=100)[-1] if len(latencies) >= 2 else None
    return {
        "clients": clients,
        "seconds": seconds,
        "image_mb": round(len(image) / 2**20, 2),
        "served": statuses.get(200, 0),
        "busy_503": statuses.get(503, 0),
        "other": {str(k): v for k, v in statuses.items() if k not in (200, 503)},
        "p99_latency_s": None if p99 is None else round(p99, 3),
        "peak_rss_mb": round(max(rss for _, rss in samples) / 2**20, 1),
        "rss_first_window_mb": round(statistics.mean(first) / 2**20, 1),
        "rss_last_window_mb": round(statistics.mean(last) / 2**20, 1),
        "rss_growth": round(growth, 4),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--image-mb", type=float, default=5)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--window", type=float, default=10, help="seconds compared at each end")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipcap-soak-") as work:
        checkpoint = tiny_checkpoint(Path(work))
        image = noise_png(args.image_mb)
        process, url = start_server(checkpoint, args.max_queue, args.image_mb * 1.5)
        try:
            result = soak(url, process.pid, args.clients, args.seconds, image, args.window)
            result["healthy_after"] = httpx.get(url + "/health").status_code == 200
        finally:
            process.terminate()
            process.wait(timeout=30)
    from common import save_result

    save_result("serve_soak", {"max_queue": args.max_queue, **result})


if __name__ == "__main__":
    main()
