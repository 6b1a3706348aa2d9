"""CIDEr-D as a training reward: its time against the model work of one self-critical step.

    python benchmarks/cider_reward.py [--images 40] [--samples 5]

A self-critical (SCST) step on a batch of 40 images samples 5 captions per image with
`generate()`, scores each sample with CIDEr-D against the image's references, and runs one
teacher-forced forward and backward pass over the 200 samples. This times the three parts
separately with GPT-2 124M (random weights, the default 6 of 12 blocks frozen), on COCO-like
references whose document frequencies come from 5,000 images, and reports the reward's share.
Target: at most 10% of the step. The step here is the sum of its parts, on a batch larger than
`scst_speed.py` can afford on a CPU; `scst_speed.py` times the reward inside real
`--objective scst` steps.
"""

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import build_gpt2_124m, coco_like_captions, save_result

from clipcap_cache.evaluation.cider import CiderD
from clipcap_cache.inference.generate import DecodeConfig, generate_captions
from clipcap_cache.model import IGNORE_INDEX, ModelConfig, build_model, load_tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--corpus", type=int, default=5000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    gpt2_dir = build_gpt2_124m(work / "gpt2")
    tokenizer = load_tokenizer(str(gpt2_dir))
    torch.manual_seed(0)
    model = build_model(ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=512))

    captions = coco_like_captions(5 * args.corpus)
    corpus = [captions[i * 5 : (i + 1) * 5] for i in range(args.corpus)]
    start = time.perf_counter()
    scorer = CiderD(corpus)
    document_frequency_seconds = time.perf_counter() - start
    rng = random.Random(0)
    batch_refs = [corpus[i] for i in rng.sample(range(args.corpus), args.images)]

    embeddings = torch.randn(args.images, 512)
    decode = DecodeConfig(strategy="sample", num_captions=args.samples, max_tokens=20, top_p=1.0)
    start = time.perf_counter()
    sampled = generate_captions(model, tokenizer, embeddings, decode, batch_size=args.images)
    sample_seconds = time.perf_counter() - start
    # Random weights babble: score COCO-like captions of the same count instead, as a trained
    # model's samples would be.
    candidates = [rng.choice(captions) for _ in range(args.images * args.samples)]
    references = [refs for refs in batch_refs for _ in range(args.samples)]
    scorer.score(candidates, references)  # the references' vectors are kept after first use
    start = time.perf_counter()
    for _ in range(3):
        scorer.score(candidates, references)
    reward_seconds = (time.perf_counter() - start) / 3

    texts = [t for image in sampled for t in image]
    tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    tokens = encoded["input_ids"][:, :20]
    labels = tokens.masked_fill(encoded["attention_mask"][:, :20] == 0, IGNORE_INDEX)
    model.train()
    start = time.perf_counter()
    loss = model(embeddings.repeat_interleave(args.samples, 0), tokens, labels)
    loss.backward()
    backward_seconds = time.perf_counter() - start
    shutil.rmtree(work)

    step = sample_seconds + reward_seconds + backward_seconds
    save_result(
        "cider_reward",
        {
            "images": args.images,
            "samples_per_image": args.samples,
            "document_frequency_images": args.corpus,
            "document_frequency_s": round(document_frequency_seconds, 2),
            "sampling_s": round(sample_seconds, 2),
            "reward_s": round(reward_seconds, 4),
            "forward_backward_s": round(backward_seconds, 2),
            "reward_share_of_step": round(reward_seconds / step, 4),
        },
    )


if __name__ == "__main__":
    main()
