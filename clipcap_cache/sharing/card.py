"""The model card of an export: README.md with the hub's YAML front matter, then what it is.

The front matter is what the hub indexes (`library_name`, `pipeline_tag`, `base_model`, `tags`,
`license`, `datasets`); the body says how to use the model, its architecture, how it was trained
and on which cache, and the `clipcap evaluate` results found beside it, each with its split and
decoding settings. Everything comes from the checkpoint's config.json and the evaluations' own
metrics.json: nothing is typed in twice.
"""

import json
from dataclasses import dataclass

LIBRARY = "clipcap-cache"
PIPELINE_TAG = "image-to-text"
TAGS = ("image-captioning", "clipcap", "clip", "gpt2")
# Training metrics that describe the run's speed or position rather than the model.
NOT_SCORES = {"epoch", "step", "lr", "seconds", "captions_per_second"}


@dataclass(frozen=True)
class BaseModel:
    """A frozen base model of the checkpoint, and how an export refers to it."""

    what: str  # "CLIP", "GPT-2"
    folder: str  # its folder under base/ and its option (--base-clip): "clip", "gpt2"
    source: str  # what the checkpoint names: a hub name or a local directory
    reference: str | None  # what the export names: a hub name, or ./base/FOLDER
    local: bool  # the checkpoint names a local directory
    copied: bool = False  # copied into the export (--self-contained)

    @property
    def hub_name(self) -> str | None:
        """The hub name the export gives it, if any (not a copy inside the folder)."""
        return None if self.copied else self.reference


@dataclass(frozen=True)
class Evaluation:
    """One `clipcap evaluate` result of the exported checkpoint."""

    folder: str
    split: str
    images: int | None
    metrics: dict[str, float]
    decode: dict | None  # DecodeConfig's fields; None where the captions were read from a file
    features: str | None  # the cache's file name
    step_recorded: bool  # False for results of a version that did not record their step


def model_card(
    config: dict,
    *,
    title: str,
    repo: str | None,
    folder: str,
    bases: tuple[BaseModel, BaseModel],
    weights: dict[str, int],
    evaluations: list[Evaluation],
    license: str,
    datasets: list[str],
) -> str:
    """The text of README.md for an export whose config.json is `config`.

    Args:
        config: the exported config.json.
        title: the card's heading.
        repo: the hub id it is shared as, if known; the usage lines name it (else `folder`).
        folder: the export folder's name.
        bases: the CLIP and GPT-2 base models.
        weights: trained parameters by top-level module (`projector`, `gpt2`).
        evaluations: the checkpoint's evaluation results.
        license: the hub license id.
        datasets: hub dataset ids it was trained on, if known.

    """
    sections = [
        _front_matter(bases, license, datasets),
        f"# {title}\n\n{_summary(config, bases)}",
        _usage(repo, folder),
        _architecture(config, bases, weights),
        _training(config),
        _evaluation(evaluations),
        _files(bases),
    ]
    return "\n\n".join(sections) + "\n"


def _front_matter(bases, license: str, datasets: list[str]) -> str:
    lines = ["---", f"library_name: {LIBRARY}", f"pipeline_tag: {PIPELINE_TAG}"]
    hub_names = [b.hub_name for b in bases if b.hub_name]
    if hub_names:
        lines += ["base_model:", *(f"- {_yaml(n)}" for n in hub_names)]
    lines += ["tags:", *(f"- {t}" for t in TAGS)]
    lines.append(f"license: {_yaml(license)}")
    if datasets:
        lines += ["datasets:", *(f"- {_yaml(d)}" for d in datasets)]
    return "\n".join([*lines, "---"])


def _yaml(text: str) -> str:
    """A YAML scalar: a JSON string is one, with every character escaped as YAML expects."""
    return json.dumps(text)


def _summary(config: dict, bases) -> str:
    model = config["model"]
    clip, gpt2 = bases
    return (
        f"An image captioning model trained with `{LIBRARY}`, "
        "after ClipCap (Mokady et al., 2021): the frozen CLIP image encoder "
        f"{_name(clip)} embeds the image, a `{model['projector']}` projector maps the embedding "
        f"to a prefix of {model['prefix_length']} GPT-2 input embeddings, and the GPT-2 model "
        f"{_name(gpt2)} writes the caption after it."
    )


def _name(base: BaseModel) -> str:
    return f"`{base.reference}` (in this folder)" if base.copied else f"`{base.reference}`"


def _usage(repo: str | None, folder: str) -> str:
    where = repo or f"path/to/{folder}"
    return (
        "## Use it\n\n"
        "```bash\n"
        f'pip install "{LIBRARY}[hub]"\n'
        f"clipcap caption photo.jpg --checkpoint {where}\n"
        "```\n\n"
        "```python\n"
        "from clipcap_cache import Captioner\n\n"
        f'captioner = Captioner.from_checkpoint("{where}")\n'
        'captioner(["photo.jpg"], beams=5)  # [[{"caption": ..., "score": ...}]]\n'
        "```\n\n"
        + (
            "The checkpoint is downloaded once into the Hugging Face hub cache; "
            "`HF_HUB_OFFLINE=1` then loads it from there without the network."
            if repo
            else "Once pushed with `clipcap push`, the same lines take its hub id, USER/NAME."
        )
    )


def _architecture(config: dict, bases, weights: dict[str, int]) -> str:
    model = config["model"]
    clip, gpt2 = bases
    projector = f"`{model['projector']}`"
    if model["projector"] == "transformer":
        projector += (
            f", {model.get('projector_layers')} layers, {model.get('projector_heads')} heads"
        )
    if model.get("normalize_prefix"):
        projector += ", on the L2-normalised embedding"
    total = sum(weights.values())
    parts = ", ".join(f"{name} {count:,}" for name, count in sorted(weights.items()))
    rows = [
        ("image encoder", f"CLIP {_name(clip)}, frozen; {config['embedding_dim']}-d embeddings"),
        ("projector", projector),
        ("prefix length", str(model["prefix_length"])),
        ("language model", f"GPT-2 {_name(gpt2)}"),
        ("frozen GPT-2 blocks", f"the first {model.get('freeze_layers')} (and the embeddings)"),
        ("trainable parameters", f"{total:,} ({parts})"),
    ]
    return (
        "## Architecture\n\n"
        + _table(("part", "setting"), rows)
        + (
            "\n\nOnly the trainable tensors are in `model.safetensors`; the frozen weights are the "
            "base models'."
        )
    )


def _training(config: dict) -> str:
    train = config.get("train", {})
    keys = (
        "objective",
        "epochs",
        "batch_size",
        "grad_accum",
        "lr",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "max_caption_tokens",
        "precision",
        "seed",
        "init",
    )
    if train.get("objective") == "scst":
        keys += ("samples", "baseline", "reward", "cider_weight", "clip_weight")
    rows = [(f"`{k}`", _value(train[k])) for k in keys if k in train and train[k] is not None]
    text = "## Training\n\n"
    if "epoch" in config:
        text += f"This checkpoint was saved after epoch {config['epoch']}"
        text += f" (optimizer step {config['step']}).\n\n" if "step" in config else ".\n\n"
    text += _table(("setting", "value"), rows) if rows else "The training settings were not kept."
    cache = train.get("features")
    text += (
        f"\n\nIt was trained from the CLIP feature cache `{cache or 'unknown'}`, made by "
        f"`clipcap extract-features` with the CLIP model `{config['clip_model']}` "
        f"({config['embedding_dim']}-d) from the annotations `{config.get('cache_source')}` "
        "(file name and fingerprint)."
    )
    scores = {
        k: v
        for k, v in (config.get("metrics") or {}).items()
        if k not in NOT_SCORES and isinstance(v, int | float)
    }
    if scores:
        text += "\n\nAt that save, on the validation split:\n\n" + _table(
            ("metric", "value"), [(k, _value(v)) for k, v in scores.items()]
        )
    return text


def _evaluation(evaluations: list[Evaluation]) -> str:
    if not evaluations:
        return (
            "## Evaluation\n\nNo `clipcap evaluate` results were found beside the checkpoint. "
            "`clipcap evaluate RUN --features CACHE --split test` before the export puts them here."
        )
    names = list(dict.fromkeys(m for e in evaluations for m in e.metrics))
    rows = []
    for e in evaluations:
        rows.append(
            (
                e.split,
                "?" if e.images is None else str(e.images),
                describe_decoding(e.decode),
                *(_value(e.metrics[m]) if m in e.metrics else "" for m in names),
            )
        )
    text = "## Evaluation\n\n" + _table(("split", "images", "decoding", *names), rows)
    caches = sorted({e.features for e in evaluations if e.features})
    text += (
        "\n\nScored by `clipcap evaluate` (COCO caption metrics after the PTB tokenizer, "
        "each caption against all the references of its image)"
        + (f" on the cache {', '.join(f'`{c}`' for c in caches)}" if caches else "")
        + "."
    )
    if not all(e.step_recorded for e in evaluations):
        text += (
            " Some results predate the step record of `clipcap evaluate`, so they may be of an "
            "earlier save of the checkpoint."
        )
    return text


def describe_decoding(decode: dict | None) -> str:
    """The decoding settings of an evaluation in words, such as "beam search, 5 beams"."""
    if not decode:
        return "captions from a file" if decode is None else "not recorded"
    strategy = decode.get("strategy")
    limit = f"at most {decode.get('max_tokens')} tokens"
    if strategy == "greedy":
        return f"greedy, {limit}"
    if strategy == "sample":
        return (
            f"sampling (top-p {decode.get('top_p')}, temperature {decode.get('temperature')}, "
            f"seed {decode.get('seed')}), {limit}"
        )
    return f"beam search, {decode.get('beams')} beams, {limit}"


def _files(bases) -> str:
    rows = [
        ("`model.safetensors`", "the trained tensors: the projector and the unfrozen GPT-2 ones"),
        ("`config.json`", "the model config, the base models, the training settings"),
        ("tokenizer files", "the GPT-2 tokenizer the model was trained with"),
    ]
    rows += [
        (f"`{b.reference[2:]}/`", f"the {b.what} base model, copied from the training machine")
        for b in bases
        if b.copied
    ]
    return "## Files\n\n" + _table(("file", "contents"), rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"`{value}`" if isinstance(value, str) else str(value)
