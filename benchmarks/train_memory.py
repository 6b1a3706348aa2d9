"""Memory that training's data takes per 100k images (5 captions each, 512-d float16): 1 and 2 ranks.

    python benchmarks/train_memory.py [--images 100000]

Writes a synthetic cache of that size with the real cache writer, and has the captions tokenized
into the file `clipcap train` keeps beside the cache. Then it opens the data exactly as
`clipcap train` does (`cache.open_cache`, `training.data.caption_data`) in one process, and in two
processes under torchrun on one node; each process assembles every batch of its share of a
shuffled epoch, as training would.

Memory is each process's proportional set size (PSS, from /proc/self/smaps): a page that two
processes share counts half in each, so the sum over the processes is what the node spends. It
counts the anonymous memory and the mapped data files, not library code paged in on the way, and
the figure is its growth from before the data is opened to after the epoch.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import save_result, write_synthetic_cache

HERE = Path(__file__).resolve().parent
BATCH = 256


def data_pss_mib(data_dir: Path) -> float:
    """PSS of the process's anonymous memory plus that of its mappings of files in `data_dir`.

    Library code paged in along the way is left out: it is not data.
    """
    total_kib, counted = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):  # a mapping's header line: address range ... [path]
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                counted = path == "" or path == "[heap]" or path.startswith(str(data_dir))
            elif first == "Pss:" and counted:
                total_kib += int(line.split()[1])
    return total_kib / 1024


def worker(features: Path, tokenizer_dir: Path, report: Path) -> None:
    """One rank: open the training data, assemble its batches of one epoch, report PSS growth."""
    from clipcap_cache import distributed
    from clipcap_cache.data.cache import open_cache
    from clipcap_cache.model import load_tokenizer
    from clipcap_cache.training.data import caption_data

    distributed.setup(torch.device("cpu"))
    world = distributed.world()
    tokenizer = load_tokenizer(str(tokenizer_dir))
    before = data_pss_mib(features.parent)
    cache = open_cache(features)
    data, _ = caption_data(cache, cache.rows_of_split("train"), tokenizer, 40)
    order = np.random.default_rng(0).permutation(len(data))
    for start in range(0, len(data), BATCH):
        data.batch(order[start : start + BATCH][world.rank :: world.size], tokenizer.eos_token_id)
    growth = distributed.all_gather_objects(data_pss_mib(features.parent) - before)
    if world.is_main:
        report.write_text(json.dumps(growth))
    distributed.teardown()


def measure(features: Path, tokenizer_dir: Path, processes: int, work: Path) -> list[float]:
    report = work / f"report-{processes}.json"
    args = [str(Path(__file__)), "--worker", str(features), str(tokenizer_dir), str(report)]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        launcher += [str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    subprocess.run(launcher + args, check=True, env=env)
    return json.loads(report.read_text())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--worker", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    from clipcap_cache.data.cache import open_cache
    from clipcap_cache.data.tokens import load_token_table
    from clipcap_cache.demo import build_tiny_tokenizer

    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    n = args.images
    features = work / "big.h5"
    captions = write_synthetic_cache(features, n)
    tokenizer = build_tiny_tokenizer(captions[:2000], vocab_size=2000)
    tokenizer.save_pretrained(work / "tokenizer")
    load_token_table(open_cache(features), tokenizer, 40)  # made once, as the first run does
    del captions
    sizes = {
        p.name.split(".", 2)[-1]: round(p.stat().st_size / 2**20, 1) for p in work.glob("big.*")
    }
    one = measure(features, work / "tokenizer", 1, work)
    two = measure(features, work / "tokenizer", 2, work)
    shutil.rmtree(work)
    per_100k = 100_000 / n
    save_result(
        "train_memory",
        {
            "images": n,
            "captions": n * 5,
            "file_mib": sizes,
            "one_rank_mib": round(one[0], 1),
            "two_ranks_mib": [round(x, 1) for x in two],
            "one_rank_mib_per_100k": round(one[0] * per_100k, 1),
            "two_ranks_total_mib_per_100k": round(sum(two) * per_100k, 1),
            "two_over_one": round(sum(two) / one[0], 3),
        },
    )


if __name__ == "__main__":
    main()
