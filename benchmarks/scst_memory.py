"""Peak memory of an SCST step's log-probabilities: chunked (`model.chunked_log_probs`) against the
full (B*K, T, V) float32 logits it replaced.

    python benchmarks/scst_memory.py [--sequences 80] [--tokens 20] [--device cpu|cuda]

GPT-2 124M built from its config with random weights (V = 50257), the default 6 of 12 blocks
frozen, and a batch of `--sequences` sampled sequences (16 images x 5 samples by default) of
`--tokens` tokens. Each variant runs in a fresh process: the projector, GPT-2's forward pass, the
log-probabilities and the backward pass of the SCST loss. On the CPU the figure is the growth of
the resident set from just before the step to its high-water mark (`VmHWM`, reset through
/proc/self/clear_refs); on CUDA it is `torch.cuda.max_memory_allocated` above what was allocated
before the step.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import save_result

HERE = Path(__file__).resolve().parent


def full_logits_log_probs(model, prefix, tokens):
    """The computation chunking replaced: all (B, T, V) float32 logits at once."""
    k = prefix.shape[1]
    embeds = torch.cat([prefix, model.gpt2.transformer.wte(tokens).to(prefix.dtype)], dim=1)
    hidden = model.gpt2.transformer(inputs_embeds=embeds).last_hidden_state
    logits = model.gpt2.lm_head(hidden[:, k - 1 : -1]).float()  # (B, T, V)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(variant: str, sequences: int, tokens: int, device: str) -> dict:
    """One step of the chosen variant in this process; its peak memory above the start, in MiB."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from clipcap_cache.model import ClipCaptionModel, ModelConfig, freeze_gpt2

    torch.manual_seed(0)
    config = ModelConfig(gpt2_model="gpt2", clip_embedding_dim=512, freeze_layers=6)
    model = ClipCaptionModel(config, GPT2LMHeadModel(GPT2Config())).to(device).train()
    freeze_gpt2(model.gpt2, 6)
    embeddings = torch.randn(sequences, 512, device=device)
    sampled = torch.randint(0, 50257, (sequences, tokens), device=device)
    advantage = torch.randn(sequences, 1, device=device)

    def step():
        prefix = model.prefix_embeddings(embeddings)
        if variant == "full":
            log_probs = full_logits_log_probs(model, prefix, sampled)
        else:
            log_probs = model.token_log_probs(prefix, sampled)
        (-(log_probs * advantage).sum(1).mean()).backward()
        return log_probs.detach()

    step()  # warm-up: allocator pools, lazy initialisation
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark VmHWM
        before = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    log_probs = step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    grad_norm = float(
        torch.sqrt(
            sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)
        )
    )
    return {
        "peak_mib": round((peak - before) / 2**20, 1),
        "step_s": round(seconds, 3),
        "log_prob_sum": float(log_probs.double().sum()),
        "grad_norm": grad_norm,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=80)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=("full", "chunked"))  # internal: one measurement
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.sequences, args.tokens, args.device)))
        return
    results = {}
    for variant in ("full", "chunked"):
        out = subprocess.run(
            [sys.executable, str(HERE / "scst_memory.py"), "--variant", variant]
            + ["--sequences", str(args.sequences), "--tokens", str(args.tokens)]
            + ["--device", args.device],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    logits_mib = args.sequences * args.tokens * 50257 * 4 / 2**20
    save_result(
        "scst_memory",
        {
            "device": args.device,
            "sequences": args.sequences,
            "tokens": args.tokens,
            "full_logits_float32_mib": round(logits_mib, 1),
            "full": full,
            "chunked": chunked,
            "peak_ratio": round(full["peak_mib"] / max(chunked["peak_mib"], 1e-9), 2),
            "same_log_probs": abs(full["log_prob_sum"] - chunked["log_prob_sum"])
            < 1e-4 * abs(full["log_prob_sum"]),
            "grad_norm_rel_diff": abs(full["grad_norm"] - chunked["grad_norm"])
            / max(full["grad_norm"], 1e-12),
        },
    )


if __name__ == "__main__":
    main()
