"""DDP overhead: training captions/s of N processes under torchrun against one process.

    python benchmarks/ddp_overhead.py [--images 16] [--batch-size 8] [--processes 2] [--device cpu]

Both runs are the real `clipcap train` for one epoch on the same synthetic cache, with GPT-2 124M
(random weights), validation and mid-epoch saves off. The batch per process is the same:
`--batch-size B` for one process, the global `--batch-size N*B` for N processes. The figure is the
epoch's captions/s as the run records it in `metrics.jsonl`.

On the CPU all processes share the machine's cores, which the single process had to itself, so
this measures what DDP costs (the gradient all-reduce, the rank bookkeeping), not a speed-up. On a
node with N GPUs, `--device cuda` gives the scaling figure (target: at least 0.9 x N).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import build_gpt2_124m, save_result, write_synthetic_cache

REPO = Path(__file__).resolve().parents[1]


def train_command(features: Path, out: Path, gpt2_dir: Path, batch_size: int, device: str):
    return [
        str(REPO / "cli.py"),
        "train",
        str(features),
        "--out",
        str(out),
        "--gpt2-model",
        str(gpt2_dir),
        "--epochs",
        "1",
        "--batch-size",
        str(batch_size),
        "--device",
        device,
        "--no-val",
        "--save-every-steps",
        "0",
    ]


def captions_per_second(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["captions_per_second"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="captions per process")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    gpt2_dir = build_gpt2_124m(work / "gpt2")
    features = work / "features.h5"
    captions = write_synthetic_cache(features, args.images)

    single = work / "one"
    command = train_command(features, single, gpt2_dir, args.batch_size, args.device)
    subprocess.run([sys.executable, *command], check=True, capture_output=True)

    several = work / "several"
    command = train_command(
        features, several, gpt2_dir, args.batch_size * args.processes, args.device
    )
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(args.processes),
            *command,
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    one, many = captions_per_second(single), captions_per_second(several)
    shutil.rmtree(work)
    save_result(
        "ddp_overhead",
        {
            "device": args.device,
            "images": args.images,
            "captions": len(captions),
            "batch_per_process": args.batch_size,
            "processes": args.processes,
            "one_process_captions_per_s": one,
            "n_processes_captions_per_s": many,
            "ratio": round(many / one, 3),
        },
    )


if __name__ == "__main__":
    main()
