"""CLIPScore and RefCLIPScore (Hessel et al., 2021), from cached image embeddings.

    scorer = load_clip_text(cache_clip_model(cache.attrs, path, "CLIPScore"))
    clipscore(scorer, image_embeddings, candidates, references)

CLIP-S = 2.5 * max(cos(image, "A photo depicts " + caption), 0): the image vector is the cache's
`image_embeds` (CLIP's projected image features), the caption vector the text tower's projected
features. RefCLIP-S is the harmonic mean of CLIP-S and the caption's best cosine with any of its
references (each with the same prompt), floored at 0. Only the text tower of the cache's CLIP
model is loaded; no image is decoded.
"""

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

from clipcap_cache import devices
from clipcap_cache.data.cache import clip_source, recorded_clip_model
from clipcap_cache.errors import ClipcapError
from clipcap_cache.fingerprints import pretrained_fingerprint
from clipcap_cache.hub import load_pretrained, resolve_name

WEIGHT = 2.5  # Hessel et al.'s rescaling of the cosine
PROMPT = "A photo depicts"  # put before every caption and reference, as Hessel et al. do


@dataclass
class ClipText:
    """CLIP's text tower with its projection, and its tokenizer."""

    model: CLIPTextModelWithProjection
    tokenizer: object
    device: torch.device
    name: str = ""  # the CLIP model's hub name or absolute folder
    fingerprint: str | None = None  # of the CLIP weight files (`pretrained_fingerprint`)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) of `PROMPT + text`, float32, CPU."""
        embeds = self.embed([f"{PROMPT} {t}" for t in texts], batch_size)
        return torch.nn.functional.normalize(embeds, dim=-1)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """CLIP's `text_embeds` (N, D) of the texts as they are, float32, CPU, not normalised."""
        limit = self.model.config.max_position_embeddings
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            ).to(self.device)
            out.append(self.model(**tokens).text_embeds.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)


def cache_clip_model(attrs: dict, path: str, needed_by: str) -> str:
    """The CLIP model a feature cache was made with, or a one-line error naming what needs it.

    The weights now at that name are checked against the cache's fingerprint of them (before any
    model loads or file is written), so CLIPScore never scores one model's image embeddings with
    another's text tower.
    """
    from clipcap_cache.checkpoint import check_clip_match

    name = recorded_clip_model(attrs)
    if not name:
        raise ClipcapError(f"{path} does not record its CLIP model, which {needed_by} needs")
    dim = attrs.get("embedding_dim")
    check_clip_match(
        clip_source(attrs, dim),
        name,
        dim,
        f"CLIP model {name}",
        f"the cache {path}",
        pretrained_fingerprint(name),
    )
    return name


def check_loaded_clip(attrs: dict, path: str, text: "ClipText") -> None:
    """`cache_clip_model`'s check again, on the text tower as loaded.

    A hub model that was not in the local cache had no weight files to fingerprint before it
    loaded (it was downloaded by the load): its files are compared now.
    """
    from clipcap_cache.checkpoint import check_clip_match

    dim = attrs.get("embedding_dim")
    name = recorded_clip_model(attrs)
    source = clip_source(attrs, dim)
    check_clip_match(source, name, dim, f"CLIP model {name}", f"the cache {path}", text.fingerprint)


def load_clip_text(name_or_dir: str, device: torch.device | str = "cpu") -> ClipText:
    """Load only the text tower and projection of a CLIP checkpoint, with its tokenizer.

    The weights are loaded in the inference precision of `device` (`devices.inference_dtype`).
    """
    device = torch.device(device)
    config = load_pretrained(AutoConfig.from_pretrained, name_or_dir, "CLIP model")
    if config.model_type != "clip":
        raise ClipcapError(f"'{name_or_dir}' is a '{config.model_type}' model, not a full CLIP")
    text_config = config.text_config
    text_config.projection_dim = config.projection_dim
    model = load_pretrained(
        CLIPTextModelWithProjection.from_pretrained,
        name_or_dir,
        "CLIP text tower",
        config=text_config,
        dtype=devices.inference_dtype(device),
    )
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_dir, "CLIP tokenizer")
    return ClipText(
        model.to(device).eval(),
        tokenizer,
        device,
        resolve_name(name_or_dir),
        pretrained_fingerprint(name_or_dir),
    )


def clipscore(
    text: ClipText,
    image_embeddings: np.ndarray | torch.Tensor,
    candidates: list[str],
    references: list[list[str]] | None = None,
) -> dict[str, float]:
    """Mean CLIP-S of the candidates, and mean RefCLIP-S when references are given."""
    captions = text.encode(candidates)
    per_image = _clip_s(image_embeddings, captions)
    result = {"clipscore": per_image.mean().item()}
    if references is not None:
        flat = [r for refs in references for r in refs]
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs])
        similarity = (captions[owner] * text.encode(flat)).sum(-1)  # (R,)
        best = torch.full((len(candidates),), -1.0).scatter_reduce(0, owner, similarity, "amax")
        best = torch.clamp(best, min=0)
        harmonic = 2 * per_image * best / (per_image + best)
        result["refclipscore"] = torch.nan_to_num(harmonic, nan=0.0).mean().item()
    return result


def clip_s(
    text: ClipText, image_embeddings: np.ndarray | torch.Tensor, candidates: list[str]
) -> torch.Tensor:
    """CLIP-S (N,) of each candidate with its image: the self-critical reward `clip`."""
    return _clip_s(image_embeddings, text.encode(candidates))


def _clip_s(image_embeddings: np.ndarray | torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(image_embeddings), dtype=torch.float32)
    images = torch.nn.functional.normalize(images, dim=-1)
    return WEIGHT * torch.clamp((images * captions).sum(-1), min=0)
