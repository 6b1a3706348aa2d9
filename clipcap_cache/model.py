"""The caption model: a projector from a CLIP embedding to a GPT-2 prefix, and GPT-2 itself.

A CLIP `image_embeds` vector (D) is mapped to K prefix embeddings of GPT-2's width (H). GPT-2 reads
`[prefix; caption tokens]` and is trained to predict the caption and its EOS. Two projectors are
provided, both after ClipCap (Mokady et al., 2021):

- `mlp`: Linear D -> K*H/2, Tanh, Linear -> K*H.
- `transformer`: a linear map of the embedding to K tokens, K learned constant tokens appended,
  a small transformer over both, and the output read at the constant positions.

`build_model(config)` makes the model from its config alone (the GPT-2 base weights come from
`config.gpt2_model`); trained tensors are loaded separately by `checkpoint.py`.
"""

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from clipcap_cache.checks import at_least, check_types
from clipcap_cache.errors import ClipcapError
from clipcap_cache.fingerprints import legacy_fingerprint, weights_fingerprint
from clipcap_cache.hub import load_pretrained, resolve_name
from clipcap_cache.options import check_choices, option

log = logging.getLogger(__name__)
PROJECTORS = ("mlp", "transformer")
IGNORE_INDEX = -100  # label value that cross-entropy skips: prefix and padding positions


@dataclass
class ModelConfig:
    """Architecture of the caption model; saved in every checkpoint's config.json."""

    gpt2_model: str = option(
        "gpt2", help="GPT-2 hub name or local directory (any GPT-2-family model)."
    )
    clip_embedding_dim: int = option(512, help="D, taken from the feature cache.", cli=False)
    prefix_length: int = option(10, help="K, prefix embeddings per image.")
    projector: str = option("mlp", help="The projector's architecture.", choices=PROJECTORS)
    normalize_prefix: bool = option(
        False, help="L2-normalise the CLIP embedding before projecting it."
    )
    freeze_layers: int | None = option(
        None, help="Frozen GPT-2 blocks from the bottom.", default_text="half of the blocks"
    )
    projector_layers: int = option(8, help="Transformer projector depth (ClipCap uses 8).")
    projector_heads: int = option(8, help="Transformer projector heads; must divide H.")

    def __post_init__(self):
        check_types(self)
        check_choices(self)
        at_least(self, 1, "prefix_length", "clip_embedding_dim", "projector_layers")
        at_least(self, 1, "projector_heads")
        at_least(self, 0, "freeze_layers")
        if not self.gpt2_model.strip():
            raise ClipcapError("--gpt2-model must name a model")


class MLPProjector(nn.Module):
    """ClipCap's MLP mapper: (B, D) -> (B, K, H)."""

    def __init__(self, embedding_dim: int, prefix_length: int, hidden_size: int):
        super().__init__()
        self.prefix_length, self.hidden_size = prefix_length, hidden_size
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, prefix_length * hidden_size // 2),
            nn.Tanh(),
            nn.Linear(prefix_length * hidden_size // 2, prefix_length * hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, self.prefix_length, self.hidden_size)


class TransformerProjector(nn.Module):
    """ClipCap's mapping network: (B, D) -> (B, K, H) through learned constant prefix tokens."""

    def __init__(
        self,
        embedding_dim: int,
        prefix_length: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ClipcapError(
                f"projector heads ({num_heads}) must divide GPT-2 width ({hidden_size})"
            )
        self.prefix_length, self.hidden_size = prefix_length, hidden_size
        self.to_tokens = nn.Linear(embedding_dim, prefix_length * hidden_size)
        self.constant = nn.Parameter(torch.randn(prefix_length, hidden_size))
        layer = nn.TransformerEncoderLayer(
            hidden_size,
            num_heads,
            dim_feedforward=2 * hidden_size,
            dropout=0.0,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.to_tokens(x).view(-1, self.prefix_length, self.hidden_size)  # (B, K, H)
        constant = self.constant.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, K, H)
        out = self.transformer(torch.cat([tokens, constant], dim=1))  # (B, 2K, H)
        return out[:, self.prefix_length :]


class ClipCaptionModel(nn.Module):
    """Projector plus GPT-2; `forward` returns the caption loss."""

    def __init__(self, config: ModelConfig, gpt2: GPT2LMHeadModel):
        super().__init__()
        self.config = config
        self.gpt2 = gpt2
        hidden = gpt2.config.n_embd
        if config.projector == "mlp":
            self.projector = MLPProjector(config.clip_embedding_dim, config.prefix_length, hidden)
        else:
            self.projector = TransformerProjector(
                config.clip_embedding_dim,
                config.prefix_length,
                hidden,
                config.projector_layers,
                config.projector_heads,
            )

    def prefix_embeddings(
        self, clip_embeddings: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, D) CLIP embeddings -> (B, K, H) GPT-2 input embeddings.

        `noise` (B, D), in training only, is added after the normalisation, as CapDec does: the
        noisy embedding is not normalised again.
        """
        x = clip_embeddings.to(self.projector_dtype)
        if self.config.normalize_prefix:
            x = F.normalize(x, dim=-1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return self.projector(x)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(
        self,
        clip_embeddings: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over the labelled tokens; without labels, token log-probs.

        `input_ids` (B, T) are right-padded; `labels` (B, T) equal them with IGNORE_INDEX at the
        padding. Right padding needs no attention mask under causal attention: a real token never
        attends to a later pad. Without `labels` the result is `token_log_probs` (B, T), which
        self-critical training differentiates (it goes through `forward` so that
        DistributedDataParallel sees the pass). A prompt (retrieved captions) is part of
        `input_ids`, its labels IGNORE_INDEX. `noise` (B, D) is added to the embeddings
        (`prefix_embeddings`).
        """
        prefix = self.prefix_embeddings(clip_embeddings, noise)  # (B, K, H)
        if labels is None:
            return self.token_log_probs(prefix, input_ids)
        tokens = self.gpt2.transformer.wte(input_ids)  # (B, T, H)
        hidden = self.gpt2.transformer(
            inputs_embeds=torch.cat([prefix, tokens.to(prefix.dtype)], dim=1)
        ).last_hidden_state  # (B, K+T, H)
        # Position K-1+t predicts caption token t. Project only the positions that carry a label,
        # so the vocabulary-sized head never runs over the prefix or padding.
        predictors = hidden[:, self.config.prefix_length - 1 : -1]  # (B, T, H)
        keep = labels != IGNORE_INDEX
        logits = self.gpt2.lm_head(predictors[keep])  # (N, V)
        return F.cross_entropy(logits.float(), labels[keep])

    def token_log_probs(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probability (B, T) of each token given the prefix (B, K, H) and the tokens before it.

        The vocabulary-sized logits are made a few rows at a time (`chunked_log_probs`), never
        all (B, T, V) at once.
        """
        k = prefix.shape[1]
        embeds = torch.cat([prefix, self.gpt2.transformer.wte(tokens).to(prefix.dtype)], dim=1)
        hidden = self.gpt2.transformer(inputs_embeds=embeds).last_hidden_state
        return chunked_log_probs(self.gpt2.lm_head, hidden[:, k - 1 : -1], tokens)


LOG_PROB_CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MiB of float32, 167 rows of GPT-2's 50257


def chunked_log_probs(
    head: nn.Linear,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """`log_softmax(head(hidden)).gather(tokens)` (B, T), holding one chunk of logits at a time.

    Self-critical training scores B x K sampled sequences: their full float32 logits would be
    B x K x T x V x 4 bytes (800 MB for 200 sequences of 20 tokens with GPT-2), and autograd
    would keep them until the backward pass. Here the (B * T) rows are cut into chunks of at most
    `chunk_elements` logits. Each chunk's logits are freed as soon as its log-probabilities are
    taken; when a gradient is needed, the chunk is checkpointed, so that the backward pass
    recomputes its logits (one more head matmul per chunk) instead of keeping them. The result
    and its gradients equal the unchunked computation's up to float rounding.

    Args:
        head: the language-model head, H -> V.
        hidden: (B, T, H) the hidden states that predict `tokens`.
        tokens: (B, T) the tokens whose log-probabilities are wanted.
        chunk_elements: logits per chunk, at most (at least one row); LOG_PROB_CHUNK_ELEMENTS
            by default.

    Returns:
        (B, T) float32 log-probabilities.

    """
    rows = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
    targets = tokens.reshape(-1)  # (B*T,)
    step = max(1, (chunk_elements or LOG_PROB_CHUNK_ELEMENTS) // head.out_features)
    keep_graph = torch.is_grad_enabled() and (
        rows.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    parts = []
    for start in range(0, rows.shape[0], step):
        chunk, chunk_targets = rows[start : start + step], targets[start : start + step]
        if keep_graph:
            # Non-reentrant checkpointing replays the chunk under the same autocast state.
            parts.append(checkpoint(_log_probs, head, chunk, chunk_targets, use_reentrant=False))
        else:
            parts.append(_log_probs(head, chunk, chunk_targets))
    if not parts:
        return rows.new_zeros(tokens.shape, dtype=torch.float32)
    return torch.cat(parts).view(tokens.shape)


def _log_probs(head: nn.Linear, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) log-probabilities of `targets` under `head(rows)` (N, V), in float32."""
    logits = head(rows).float()  # (N, V)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def load_gpt2(name_or_dir: str) -> GPT2LMHeadModel:
    """Load a GPT-2-family language model by hub name or directory."""
    config = load_pretrained(AutoConfig.from_pretrained, name_or_dir, "GPT-2 model")
    if config.model_type != "gpt2":
        raise ClipcapError(
            f"'{name_or_dir}' is a '{config.model_type}' model, not a GPT-2-family model"
        )
    model = load_pretrained(
        AutoModelForCausalLM.from_pretrained, name_or_dir, "GPT-2 model", dtype=torch.float32
    )
    if not isinstance(model, GPT2LMHeadModel):
        raise ClipcapError(f"'{name_or_dir}' is a {type(model).__name__}, not a GPT-2-family model")
    return model


def load_tokenizer(name_or_dir: str):
    """Load the GPT-2 tokenizer, making sure it has an EOS token to end captions with."""
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_dir, "GPT-2 tokenizer")
    if len(tokenizer) < 2:
        # transformers builds an empty tokenizer when a folder has no tokenizer files.
        raise ClipcapError(
            f"cannot load GPT-2 tokenizer from '{name_or_dir}': no tokenizer files there "
            "(tokenizer.json, or vocab.json and merges.txt)"
        )
    if tokenizer.eos_token_id is None:
        raise ClipcapError(f"the tokenizer of '{name_or_dir}' has no EOS token")
    return tokenizer


def build_model(config: ModelConfig) -> ClipCaptionModel:
    """Build the caption model from its config: GPT-2 base weights, fresh projector, freezing.

    `config` is left as it was. The model holds the resolved copy as `model.config`
    (`resolve_model_config`): that copy, not `config`, is the one to record beside the weights.
    `model.base_fingerprint` is the fingerprint of the base GPT-2 as loaded (`base_fingerprint`).
    """
    gpt2 = load_gpt2(resolve_name(config.gpt2_model))
    fingerprint = base_fingerprint(gpt2)
    legacy = legacy_fingerprint(gpt2.named_parameters())  # what older checkpoints recorded
    resolved = resolve_model_config(config, gpt2.config.n_layer)
    model = ClipCaptionModel(resolved, gpt2)
    model.base_fingerprint = fingerprint
    model.legacy_base_fingerprint = legacy
    freeze_gpt2(model.gpt2, resolved.freeze_layers)
    return model


def base_fingerprint(gpt2: nn.Module) -> str:
    """A short hash of a GPT-2's weights, recorded in every checkpoint it trains.

    A checkpoint holds only the trained tensors; the embeddings and frozen blocks come from the
    base model named in its config. The hash (`fingerprints.weights_fingerprint` of every
    parameter) tells another model of the same shape at that name apart, in well under a second for
    large models.
    """
    return weights_fingerprint(gpt2.named_parameters())


def resolve_model_config(config: ModelConfig, n_layer: int) -> ModelConfig:
    """A copy of `config` with its settings made definite for a GPT-2 of `n_layer` blocks.

    A local `gpt2_model` directory becomes absolute, and an unset `freeze_layers` becomes half
    of the blocks.
    """
    return replace(
        config,
        gpt2_model=resolve_name(config.gpt2_model),
        freeze_layers=n_layer // 2 if config.freeze_layers is None else config.freeze_layers,
    )


def freeze_gpt2(gpt2: GPT2LMHeadModel, n_layers: int) -> None:
    """Freeze GPT-2's embeddings (and so the tied output head) and its first `n_layers` blocks.

    Idempotent: every parameter's `requires_grad` is set, not only flipped. With `n_layers` equal
    to the number of blocks the whole of GPT-2 is frozen, final layer norm included.
    """
    blocks = gpt2.transformer.h
    if not 0 <= n_layers <= len(blocks):
        raise ClipcapError(
            f"--freeze-layers {n_layers} is out of range: this GPT-2 has {len(blocks)} blocks"
        )
    gpt2.requires_grad_(True)
    for module in (gpt2.transformer.wte, gpt2.transformer.wpe, gpt2.lm_head):
        module.requires_grad_(False)
    for block in blocks[:n_layers]:
        block.requires_grad_(False)
    gpt2.transformer.ln_f.requires_grad_(n_layers < len(blocks))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, each shared tensor counted once."""
    seen, trainable, frozen = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changes: the projector and the unfrozen GPT-2 parameters."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch of captions: the tokenizer's pad token, or EOS (GPT-2 has no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put `module` in eval mode (no dropout) while the block runs, then back in its own mode.

    The previous mode comes back even when the block raises, so a failed decode or validation
    never leaves a training model without its dropout.
    """
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
