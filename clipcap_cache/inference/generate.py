"""Caption decoding from CLIP embeddings, shared by `caption`, `evaluate` and training validation.

Decoding is transformers' `generate()` on `inputs_embeds` (the projector's prefix), which brings
the KV cache, beam search and nucleus sampling; there is no hand-written decoding loop here.
"""

import unicodedata
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from clipcap_cache import devices
from clipcap_cache.checks import at_least, at_most, check_types
from clipcap_cache.errors import ClipcapError
from clipcap_cache.model import ClipCaptionModel, eval_mode, pad_token_id
from clipcap_cache.options import check_choices, option

STRATEGIES = ("beam", "greedy", "sample")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
MAX_BEAMS = 100  # a width beyond this costs minutes per image and gains nothing
MAX_NUM_CAPTIONS = 100
# A colder softmax overflows float32 once the logits are divided by it (1e-300 gives inf and
# NaN probabilities); a hotter one is uniform noise already.
TEMPERATURE_RANGE = (0.01, 100.0)


@dataclass
class DecodeConfig:
    """How captions are decoded."""

    # The command line and the server spell the strategy as two switches (`StrategyFlags`).
    strategy: str = option("beam", help="Decoding strategy.", choices=STRATEGIES, cli=False)
    beams: int = option(5, help="Beam width.")
    num_captions: int = option(1, help="Captions per image: top beams or samples.")
    max_tokens: int = option(
        30, help="New tokens at most (the model's positions less its prefix at most)."
    )
    top_p: float = option(0.9, help="Nucleus mass for --sample.")
    temperature: float = option(1.0, help="Softmax temperature for --sample.")
    seed: int = option(0, help="Random seed for --sample.")

    def __post_init__(self):
        check_types(self)
        check_choices(self)
        at_least(self, 1, "beams", "num_captions", "max_tokens")
        at_least(self, 0, "seed")
        at_most(self, MAX_SEED, "seed")
        at_most(self, MAX_BEAMS, "beams")
        at_most(self, MAX_NUM_CAPTIONS, "num_captions")
        if self.strategy == "beam" and self.num_captions > self.beams:
            raise ClipcapError(
                f"--num-captions {self.num_captions} is more than --beams "
                f"{self.beams}: beam search returns at most one caption per beam"
            )
        if self.strategy == "greedy" and self.num_captions != 1:
            raise ClipcapError(
                "greedy decoding gives one caption per image; use --beams or --sample for more"
            )
        if not 0 < self.top_p <= 1:
            raise ClipcapError(f"--top-p must be in (0, 1], not {self.top_p}")
        low, high = TEMPERATURE_RANGE
        if not low <= self.temperature <= high:
            raise ClipcapError(
                f"--temperature must be between {low} and {high}, not {self.temperature}"
            )

    def check_positions(self, model: ClipCaptionModel) -> None:
        """Refuse a `max_tokens` that would run past the model's positions after its prefix."""
        room = max_new_tokens(model)
        if self.max_tokens > room:
            raise ClipcapError(
                f"--max-tokens {self.max_tokens} is more than this model can generate: its GPT-2 "
                f"has {room + model.config.prefix_length} positions, {model.config.prefix_length} "
                f"of them for the prefix, so at most {room}"
            )

    def generation_config(self, eos_token_id: int, pad_token_id: int) -> GenerationConfig:
        common = dict(
            max_new_tokens=self.max_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            num_return_sequences=self.num_captions,
        )
        if self.strategy == "greedy":
            return GenerationConfig(do_sample=False, num_beams=1, **common)
        if self.strategy == "beam":
            return GenerationConfig(
                do_sample=False, num_beams=self.beams, early_stopping=True, **common
            )
        return GenerationConfig(
            do_sample=True,
            num_beams=1,
            top_p=self.top_p,
            top_k=0,
            temperature=self.temperature,
            **common,
        )


def max_new_tokens(model: ClipCaptionModel) -> int:
    """How many tokens the model can generate after its prefix: GPT-2's positions less K."""
    return model.gpt2.config.n_positions - model.config.prefix_length


@dataclass
class StrategyFlags:
    """`DecodeConfig.strategy` as the command line and the server's form take it: beam unless one is set."""

    greedy: bool = option(False, help="Greedy decoding.")
    sample: bool = option(False, help="Nucleus sampling (see --top-p and --temperature).")


def decode_config(*, greedy: bool = False, sample: bool = False, **settings) -> DecodeConfig:
    """A `DecodeConfig` from options named like the command line's and the server's fields.

    `settings` are `DecodeConfig`'s other fields (`beams`, `max_tokens`, ...); left out, they keep
    its defaults.
    """
    if greedy and sample:
        raise ClipcapError("--greedy and --sample contradict each other: choose one")
    return DecodeConfig(strategy="greedy" if greedy else "sample" if sample else "beam", **settings)


def clean_caption(text: str) -> str:
    """One line of text: control characters dropped, whitespace runs collapsed to one space."""
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) != "Cc"
    )
    return " ".join(text.split())


@torch.inference_mode()
def generate_captions(
    model: ClipCaptionModel,
    tokenizer,
    clip_embeddings: torch.Tensor,
    decode: DecodeConfig,
    batch_size: int = 64,
    autocast: torch.dtype | None = None,
    progress: bool = False,
    with_scores: bool = False,
    prompts: list[list[int]] | None = None,
) -> list[list]:
    """Caption each (D,) embedding of `clip_embeddings` (N, D); returns N lists of captions.

    With `with_scores`, each caption comes as `(text, score)`: its mean log-probability per token
    under the model, the caption's tokens and its EOS counted (see `sequence_scores`). `prompts`
    holds the token ids each image's caption follows (a retrieval prompt): the model reads the
    prefix, then the prompt, and the caption is what it writes next.
    """
    decode.check_positions(model)
    with eval_mode(model):
        device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        generation_config = decode.generation_config(eos, pad_token_id(tokenizer))
        captions: list[list[str]] = []
        # Sampling draws from torch's global generator (generate() takes no other), seeded by
        # `decode.seed`; forking it leaves the caller's own random stream as it was.
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked, enabled=decode.strategy == "sample"):
            if decode.strategy == "sample":
                torch.manual_seed(decode.seed)
            starts = range(0, len(clip_embeddings), batch_size)
            for start in tqdm(starts, desc="caption", unit="batch", disable=not progress):
                batch = clip_embeddings[start : start + batch_size].to(device)
                batch_prompts = prompts[start : start + batch_size] if prompts else None
                found: list = [None] * len(batch)
                with devices.autocast(device, autocast):
                    prefix = model.prefix_embeddings(batch)  # (B, K, H)
                for positions, context in prompted(model, prefix, batch_prompts):
                    texts = _decode(
                        model, tokenizer, context, generation_config, decode, autocast, with_scores
                    )
                    for position, text in zip(positions, texts, strict=True):
                        found[position] = text
                captions.extend(found)
    return captions


def prompted(
    model: ClipCaptionModel, prefix: torch.Tensor, prompts: list[list[int]] | None
) -> list[tuple[list[int], torch.Tensor]]:
    """The contexts a batch is decoded from: its prefixes (B, K, H), each followed by its prompt.

    Images whose prompts have the same length are decoded together, `(positions, (b, K+P, H))`,
    so that no context is padded: the positions the model reads are those it was trained at.
    """
    if not prompts:
        return [(list(range(len(prefix))), prefix)]
    by_length: dict[int, list[int]] = {}
    for position, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(position)
    groups = []
    for positions in by_length.values():
        ids = torch.tensor([prompts[p] for p in positions], device=prefix.device)
        words = model.gpt2.transformer.wte(ids).to(prefix.dtype)  # (b, P, H)
        groups.append((positions, torch.cat([prefix[positions], words], dim=1)))
    return groups


def _decode(
    model: ClipCaptionModel,
    tokenizer,
    context: torch.Tensor,
    generation_config: GenerationConfig,
    decode: DecodeConfig,
    autocast: torch.dtype | None,
    with_scores: bool,
) -> list[list]:
    """One `generate()` call from contexts (B, C, H): B lists of captions (with scores)."""
    device = context.device
    with devices.autocast(device, autocast):
        attention_mask = torch.ones(context.shape[:2], dtype=torch.long, device=device)
        tokens = model.gpt2.generate(
            inputs_embeds=context,
            attention_mask=attention_mask,
            generation_config=generation_config,
        )
    # With only inputs_embeds given, generate() returns the new tokens alone.
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    texts = [clean_caption(t) for t in texts]
    n = decode.num_captions
    if with_scores:
        with devices.autocast(device, autocast):
            scores = sequence_scores(
                model, context.repeat_interleave(n, dim=0), tokens, tokenizer.eos_token_id
            )
        texts = list(zip(texts, scores.tolist(), strict=True))
    return [texts[i : i + n] for i in range(0, len(texts), n)]


def sequence_scores(
    model: ClipCaptionModel, prefix: torch.Tensor, tokens: torch.Tensor, eos: int
) -> torch.Tensor:
    """Mean log-probability per token of generated captions, EOS included: (B,) floats.

    `prefix` (B, K, H) is each caption's prefix and `tokens` (B, T) its generated tokens, which
    end at the first EOS (the rest is padding). One forward pass scores every strategy alike.
    """
    counted = counted_tokens(tokens, eos)
    return (model.token_log_probs(prefix, tokens) * counted).sum(1) / counted.sum(1)


def counted_tokens(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Which of the generated tokens (B, T) count: those up to and including the first EOS.

    What follows a sequence's first EOS is padding; a sequence without EOS counts whole.
    """
    is_eos = tokens == eos
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), tokens.shape[1] - 1)
    return torch.arange(tokens.shape[1], device=tokens.device)[None] <= first_eos[:, None]
