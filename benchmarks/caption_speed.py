"""Captioning speed: batched, KV-cached generate() against ClipCap's decoding, and batching.

    python benchmarks/caption_speed.py [--images 64] [--device cuda]

GPT-2 124M (random weights), prefix length 10, beam 5, 20 new tokens, from CLIP embeddings. The ClipCap-style
decoder is a beam search that re-runs GPT-2 over the whole sequence at every step without a KV cache, one
image at a time, as ClipCap's predict.py does. Random weights never emit EOS, so every image decodes the
full 20 tokens in both.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from common import build_gpt2_124m, save_result, timed

from clipcap_cache.devices import inference_autocast, resolve_device
from clipcap_cache.inference.generate import DecodeConfig, generate_captions
from clipcap_cache.model import ModelConfig, build_model, load_tokenizer


@torch.no_grad()
def clipcap_beam_search(model, embedding, beams: int, max_tokens: int, eos: int):
    """Beam search without a KV cache: the full sequence is re-encoded at each step."""
    generated = model.prefix_embeddings(embedding[None])  # (1, K, H)
    device = embedding.device
    scores, tokens, stopped = None, None, torch.zeros(beams, dtype=torch.bool, device=device)
    lengths = torch.ones(beams, device=device)
    for _ in range(max_tokens):
        logits = model.gpt2(inputs_embeds=generated).logits[:, -1].log_softmax(-1)  # (b, V)
        if scores is None:
            scores, next_tokens = logits[0].topk(beams)
            generated = generated.expand(beams, -1, -1)
            tokens = next_tokens[:, None]
        else:
            logits[stopped] = -float("inf")
            logits[stopped, 0] = 0
            lengths[~stopped] += 1
            total = (scores[:, None] + logits).view(-1)
            scores, flat = (total / lengths.repeat_interleave(logits.shape[1])).topk(beams)
            source, next_tokens = flat // logits.shape[1], flat % logits.shape[1]
            lengths, scores = lengths[source], scores * lengths[source]
            generated, tokens = (
                generated[source],
                torch.cat([tokens[source], next_tokens[:, None]], 1),
            )
            stopped = stopped[source]
        embedded = model.gpt2.transformer.wte(next_tokens)[:, None]
        generated = torch.cat([generated, embedded], 1)
        stopped = stopped | (next_tokens == eos)
        if stopped.all():
            break
    return tokens[scores.argmax()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--clipcap-images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    autocast = inference_autocast(device)  # as `clipcap caption`
    work = Path(tempfile.mkdtemp(prefix="clipcap-bench-"))
    gpt2_dir = build_gpt2_124m(work / "gpt2")
    torch.manual_seed(0)
    model = build_model(ModelConfig(gpt2_model=str(gpt2_dir), clip_embedding_dim=512))
    model = model.to(device).eval()
    tokenizer = load_tokenizer(str(gpt2_dir))
    embeddings = torch.randn(args.images, 512, device=device)
    decode = DecodeConfig(strategy="beam", beams=5, max_tokens=20)
    eos = tokenizer.eos_token_id

    def ours(batch_size):
        return generate_captions(
            model, tokenizer, embeddings, decode, batch_size=batch_size, autocast=autocast
        )

    generate_captions(model, tokenizer, embeddings[:2], decode, 2, autocast)  # warm-up
    batched = args.images / timed(ours, 16)
    single = args.images / timed(ours, 1)
    clipcap = args.clipcap_images / timed(
        lambda: [
            clipcap_beam_search(model, e, 5, 20, eos) for e in embeddings[: args.clipcap_images]
        ]
    )
    shutil.rmtree(work)
    save_result(
        "caption_speed",
        {
            "images": args.images,
            "device": str(device),
            "autocast": str(autocast),
            "beams": 5,
            "new_tokens": 20,
            "ours_batch16_images_per_s": round(batched, 3),
            "ours_batch1_images_per_s": round(single, 3),
            "clipcap_style_images_per_s": round(clipcap, 3),
            "speedup_vs_clipcap": round(batched / clipcap, 2),
            "batch16_vs_batch1": round(batched / single, 2),
        },
    )


if __name__ == "__main__":
    main()
