"""Validation after each epoch: the val loss, and CIDEr-D and BERTScore of greedy captions."""

from dataclasses import dataclass

import numpy as np
import torch

from clipcap_cache import checkpoint, devices
from clipcap_cache.data import cache as feature_cache
from clipcap_cache.data.annotations import ALL, VAL
from clipcap_cache.errors import ClipcapError
from clipcap_cache.evaluation.cider import CiderD
from clipcap_cache.evaluation.metrics import bertscore, make_bertscorer
from clipcap_cache.inference.generate import DecodeConfig, generate_captions
from clipcap_cache.model import IGNORE_INDEX, ClipCaptionModel, eval_mode
from clipcap_cache.retrieval import Retriever
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.data import CaptionData, caption_data


@dataclass
class ValidationSet:
    """What validation runs on: every val caption, and the val images captioned for BERTScore."""

    data: CaptionData  # every caption of the validation images
    embeddings: torch.Tensor  # (E, D) the images captioned for CIDEr-D and BERTScore
    references: list[list[str]]
    cider: CiderD | None  # their references' document frequencies (None with --eval-images 0)
    prompts: list[list[int]] | None = None  # with retrieval: the scored images' prompts


def validation_set(
    val_cache: feature_cache.MappedCache,
    val_rows: np.ndarray,
    tokenizer,
    config: TrainConfig,
    retriever: Retriever | None = None,
) -> ValidationSet:
    """The val captions and scored images; with a `retriever`, their prompts (own images skipped)."""
    data, _ = caption_data(val_cache, val_rows, tokenizer, config.max_caption_tokens, retriever)
    scored = val_rows[: config.eval_images]
    references = val_cache.references(scored)
    prompts = None
    if data.prompts is not None:
        prompts = [data.prompts.token_ids[r].tolist() for r in scored.tolist()]
    return ValidationSet(
        data,
        torch.from_numpy(np.asarray(val_cache.embeddings[scored])),
        references,
        CiderD(references) if references else None,
        prompts,
    )


def validation_source(config: TrainConfig, train_cache):
    """The cache and rows to validate on, or (None, None) when validation is off."""
    if not config.validate:
        return None, None
    if config.val_features:
        val_cache = feature_cache.open_cache(config.val_features)
        checkpoint.check_clip_match(
            feature_cache.clip_source(train_cache.attrs, train_cache.embedding_dim),
            feature_cache.recorded_clip_model(val_cache.attrs),
            val_cache.embedding_dim,
            config.val_features,
            f"the model trained on {config.features}",
            feature_cache.recorded_clip_fingerprint(val_cache.attrs),
        )
        val_cache, rows = val_cache, val_cache.rows_of_split(ALL)
    else:
        val_cache, rows = train_cache, train_cache.rows_of_split(VAL)
    # Images without a reference caption (possible in caches of older versions) give no loss
    # and cannot be scored, so validation leaves them out.
    captioned = np.zeros(val_cache.num_images, dtype=bool)
    captioned[val_cache.caption_image_index] = True
    if not captioned[rows].any():
        what = (
            f"{config.val_features} has no captioned images"
            if config.val_features
            else f"{config.features} has no val split with captions"
        )
        raise ClipcapError(
            f"{what}: pass --val-features FILE, or --no-val to train without validation"
        )
    return val_cache, rows[captioned[rows]]


def make_scorer(config: TrainConfig, device: torch.device):
    if not config.bertscore or config.eval_images == 0:
        return None
    return make_bertscorer(config.bertscore_model, config.bertscore_layers, device)


@torch.no_grad()
def validate(
    model: ClipCaptionModel,
    tokenizer,
    validation: ValidationSet,
    scorer,
    amp_dtype: torch.dtype | None,
    batch_size: int,
    pad_id: int,
) -> dict:
    """Mean val loss per token, and CIDEr-D and BERTScore of greedy captions on the first val images.

    `val_cider` takes its document frequencies from the references of the images it scores, as
    COCO evaluation's CIDEr does, so it equals pycocoevalcap's CIDEr on those images.
    """
    device = next(model.parameters()).device
    data = validation.data
    total, tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        samples = np.arange(start, min(start + batch_size, len(data)))
        embeddings, input_ids, labels = data.batch(samples, pad_id)
        n = int((labels != IGNORE_INDEX).sum())
        with eval_mode(model), devices.autocast(device, amp_dtype):
            loss = model(embeddings.to(device), input_ids.to(device), labels.to(device))
        total += loss.item() * n
        tokens += n
    row = {"val_loss": total / max(tokens, 1)}
    if len(validation.embeddings):
        captions = generate_captions(
            model,
            tokenizer,
            validation.embeddings,
            DecodeConfig(strategy="greedy"),
            batch_size=batch_size,
            autocast=devices.inference_autocast(device),
            prompts=validation.prompts,
        )
        captions = [c[0] for c in captions]
        cider = validation.cider.score(captions, validation.references)
        row["val_cider"] = float(cider.mean())
        if scorer is not None:
            row.update(bertscore(scorer, captions, validation.references))
    return row
