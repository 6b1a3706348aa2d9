"""RAM that training's in-memory data takes per 100k images (5 captions each, 512-d float16).

    python benchmarks/train_memory.py [--images 100000]

Writes a synthetic cache of that size with the real cache writer, then measures the growth of the
process's resident memory across `read_cache` and `tokenize_captions`, as `clipcap train` runs them.
"""

import argparse
import resource
import shutil
import tempfile
from pathlib import Path

from common import save_result, write_synthetic_cache

from clipcap_cache.cache import read_cache
from clipcap_cache.demo import build_tiny_tokenizer
from clipcap_cache.train import tokenize_captions


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    n, m = args.images, args.images * 5
    captions = write_synthetic_cache(work / "big.h5", n)
    tokenizer = build_tiny_tokenizer(captions[:2000], vocab_size=2000)
    del captions
    before = rss_mib()
    cache = read_cache(work / "big.h5")
    data = tokenize_captions(
        tokenizer, cache.captions, cache.caption_image_index, cache.embeddings, 40
    )
    after = rss_mib()
    del cache, data
    shutil.rmtree(work)
    save_result(
        "train_memory",
        {
            "images": n,
            "captions": m,
            "rss_growth_mib": round(after - before, 1),
            "mib_per_100k_images": round((after - before) * 100_000 / n, 1),
        },
    )


if __name__ == "__main__":
    main()
