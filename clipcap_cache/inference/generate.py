"""Caption decoding from CLIP embeddings, shared by `caption`, `evaluate` and training validation.

Decoding is transformers' `generate()` on `inputs_embeds` (the projector's prefix), which brings
the KV cache, beam search and nucleus sampling; there is no hand-written decoding loop here.

What the language model reads, per image, is

    [left padding] [visual prefix: K embeddings] [context tokens] [prompt tokens] -> caption

The prompt (`DecodeConfig.prompt`, `--prompt`) is the start of every caption: generation
continues after it, and the returned caption begins with it. Context tokens (`context_ids`, one
list per image, such as captions retrieved for it) come between the prefix and the prompt and are
not part of the caption. Rows of unequal length are padded on the left, with an attention mask,
so that every row's last input is its last prompt token.
"""

import unicodedata
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from clipcap_cache import devices
from clipcap_cache.checks import at_least, at_most, check_types
from clipcap_cache.errors import ClipcapError
from clipcap_cache.model import ClipCaptionModel, chunked_log_probs, eval_mode, pad_token_id
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
    prompt: str | None = option(
        None, help="Start every caption with this text; decoding continues after it."
    )

    def __post_init__(self):
        check_types(self)
        check_choices(self)
        at_least(self, 1, "beams", "num_captions", "max_tokens")
        at_least(self, 0, "seed")
        at_most(self, MAX_SEED, "seed")
        at_most(self, MAX_BEAMS, "beams")
        at_most(self, MAX_NUM_CAPTIONS, "num_captions")
        if self.prompt is not None and not clean_caption(self.prompt):
            raise ClipcapError(
                "--prompt is empty: give the text the captions start with, or leave it out"
            )
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


def prompt_token_ids(tokenizer, prompt: str | None) -> list[int]:
    """The tokens of a caption prompt, cleaned as captions are (`clean_caption`); [] for None."""
    return tokenizer(clean_caption(prompt))["input_ids"] if prompt else []


def check_positions(
    model: ClipCaptionModel, input_tokens: int, max_tokens: int, retrieved: bool = False
) -> None:
    """Refuse a prompt (and context) that leaves no room for the caption in GPT-2's positions.

    `retrieved`: the input tokens hold a retrieval prompt (the retrieved captions), so the
    message names the datastore rather than --prompt alone.
    """
    positions = model.gpt2.config.n_positions
    needed = model.config.prefix_length + input_tokens + max_tokens
    if input_tokens and needed > positions:
        what, fix = (
            ("the retrieval prompt (with --prompt, if given) is", "use a datastore of shorter "
             "captions, shorten --prompt")
            if retrieved
            else ("--prompt is too long:", "shorten the prompt")
        )  # fmt: skip
        raise ClipcapError(
            f"{what} {input_tokens} tokens after the "
            f"{model.config.prefix_length}-token prefix, with --max-tokens {max_tokens}, need "
            f"{needed} positions and the language model has {positions}; {fix} "
            "or lower --max-tokens"
        )


def prompted_inputs(
    model: ClipCaptionModel, prefix: torch.Tensor, rows: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The visual prefix (B, K, H) followed by each row's tokens, left-padded to one length.

    Returns the input embeddings (B, K + L, H) and their attention mask (B, K + L), or None for
    the mask when no row is padded (then every position is attended, as without tokens).
    """
    if not any(rows):
        return prefix, None
    width = max(len(r) for r in rows)
    device = prefix.device
    embed = model.gpt2.transformer.wte
    pad = torch.zeros(width, prefix.shape[2], dtype=prefix.dtype, device=device)
    embeds, masks = [], []
    for row, visual in zip(rows, prefix, strict=True):
        ids = torch.tensor(row, dtype=torch.long, device=device)
        missing = width - len(row)
        embeds.append(torch.cat([pad[:missing], visual, embed(ids).to(prefix.dtype)]))
        mask = torch.ones(len(visual) + width, dtype=torch.long, device=device)
        mask[:missing] = 0
        masks.append(mask)
    mask = torch.stack(masks)
    return torch.stack(embeds), (mask if bool((mask == 0).any()) else None)


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
    context_ids: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
) -> list[list]:
    """Caption each (D,) embedding of `clip_embeddings` (N, D); returns N lists of captions.

    With `decode.prompt`, each caption begins with the prompt and continues it. `context_ids`
    (N lists of token ids) go between each image's prefix and the prompt and are not part of
    its caption. With `with_scores`, each caption comes as `(text, score)`: the mean
    log-probability per generated token under the model, its EOS counted and the prompt not
    (see `sequence_scores`). `prompts` is another name for `context_ids`: a retrieval prompt,
    each image's retrieved captions.
    """
    if context_ids is None:
        context_ids = prompts
    decode.check_positions(model)
    if context_ids is not None and len(context_ids) != len(clip_embeddings):
        raise ValueError(f"{len(context_ids)} context rows for {len(clip_embeddings)} embeddings")
    prompt = prompt_token_ids(tokenizer, decode.prompt)
    rows = [list(c) + prompt for c in context_ids] if context_ids else None
    check_positions(
        model, max(map(len, rows)) if rows else len(prompt), decode.max_tokens, bool(rows)
    )
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
                batch_rows = rows[start : start + len(batch)] if rows else [prompt] * len(batch)
                with devices.autocast(device, autocast):
                    prefix = model.prefix_embeddings(batch)  # (B, K, H)
                    inputs, mask = prompted_inputs(model, prefix, batch_rows)  # (B, K+L, H)
                    attention_mask = (
                        mask
                        if mask is not None
                        else torch.ones(inputs.shape[:2], dtype=torch.long, device=device)
                    )
                    tokens = model.gpt2.generate(
                        inputs_embeds=inputs,
                        attention_mask=attention_mask,
                        generation_config=generation_config,
                    )
                # With only inputs_embeds given, generate() returns the new tokens alone; the
                # prompt's tokens are decoded with them, so the text joins them as one caption.
                shown = [prompt + row for row in tokens.tolist()] if prompt else tokens
                texts = tokenizer.batch_decode(shown, skip_special_tokens=True)
                texts = [clean_caption(t) for t in texts]
                n = decode.num_captions
                if with_scores:
                    with devices.autocast(device, autocast):
                        scores = sequence_scores(
                            model,
                            inputs.repeat_interleave(n, dim=0),
                            tokens,
                            eos,
                            None if mask is None else mask.repeat_interleave(n, dim=0),
                        )
                    texts = list(zip(texts, scores.tolist(), strict=True))
                captions.extend(texts[i : i + n] for i in range(0, len(texts), n))
    return captions


def sequence_scores(
    model: ClipCaptionModel,
    prefix: torch.Tensor,
    tokens: torch.Tensor,
    eos: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean log-probability per token of generated captions, EOS included: (B,) floats.

    `prefix` (B, K, H) is each caption's input embeddings (its visual prefix, and any context and
    prompt after it, with their `attention_mask` (B, K) when left-padded) and `tokens` (B, T) its
    generated tokens, which end at the first EOS (the rest is padding). One forward pass scores
    every strategy alike.
    """
    counted = counted_tokens(tokens, eos)
    if attention_mask is None:
        log_probs = model.token_log_probs(prefix, tokens)
    else:
        k = prefix.shape[1]
        embeds = torch.cat([prefix, model.gpt2.transformer.wte(tokens).to(prefix.dtype)], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # padding takes no position
        hidden = model.gpt2.transformer(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        ).last_hidden_state
        log_probs = chunked_log_probs(model.gpt2.lm_head, hidden[:, k - 1 : -1], tokens)
    return (log_probs * counted).sum(1) / counted.sum(1)


def counted_tokens(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Which of the generated tokens (B, T) count: those up to and including the first EOS.

    What follows a sequence's first EOS is padding; a sequence without EOS counts whole.
    """
    is_eos = tokens == eos
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), tokens.shape[1] - 1)
    return torch.arange(tokens.shape[1], device=tokens.device)[None] <= first_eos[:, None]
