"""Scoring captions the way the field does: COCO caption metrics and BERTScore.

    clipcap evaluate runs/coco --features data/coco_vitb32.h5 --split test

Captions are generated from the cached embeddings (no CLIP, no JPEG decoding) with the same
decoding code as `clipcap caption`, or read from an existing COCO results file (`--predictions`).
The scores themselves are `metrics.py`'s: BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap
after its PTB tokenizer, SPICE on request, and BERTScore, each candidate against all its references.
"""

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from clipcap_cache import checkpoint
from clipcap_cache.checks import at_least, check_types
from clipcap_cache.data import cache as feature_cache
from clipcap_cache.data.annotations import SPLIT_CHOICES
from clipcap_cache.devices import DEVICE, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.evaluation.clipscore import cache_clip_model, check_loaded_clip
from clipcap_cache.evaluation.metrics import (
    BERTSCORE,
    BERTSCORE_LAYERS,
    BERTSCORE_MODEL,
    check_spice,
    load_metric_models,
    score_captions,
)
from clipcap_cache.evaluation.score import coco_image_id, read_predictions
from clipcap_cache.files import make_folder, write_json_atomic
from clipcap_cache.hub import is_hub_id
from clipcap_cache.inference.captioner import Captioner
from clipcap_cache.inference.generate import DecodeConfig
from clipcap_cache.logs import log_to_file
from clipcap_cache.options import check_choices, option

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Settings of one evaluation."""

    checkpoint: str = option(
        help="Checkpoint folder, run directory or hub id (USER/NAME).", argument=True
    )
    features: str = option(help="HDF5 cache with the images and references.")
    split: str = option("test", help="Which split to score.", choices=SPLIT_CHOICES)
    out: str | None = option(
        None,
        help="Output folder.",
        default_text="RUN/eval-SPLIT; with --predictions, PREDICTIONS-eval-SPLIT beside it",
    )
    predictions: str | None = option(
        None, help="Score this COCO results file instead of generating captions."
    )
    # The command line takes DecodeConfig's own options (one caption per image).
    decode: DecodeConfig = option(default_factory=DecodeConfig, cli=False)
    batch_size: int = option(64, help="Images per generation batch.")
    device: str = DEVICE.field()
    spice: bool = option(False, help="Also compute SPICE.")
    bertscore: bool = BERTSCORE.field()
    bertscore_model: str = BERTSCORE_MODEL.field()
    bertscore_layers: int | None = BERTSCORE_LAYERS.field()
    clipscore: bool = option(
        False, help="Also CLIPScore and RefCLIPScore, with the cache's CLIP text tower."
    )
    datastore: str | None = option(
        None,
        help="Retrieve from this text file instead of the one the checkpoint was trained with.",
    )

    def __post_init__(self):
        check_types(self)
        check_choices(self)
        at_least(self, 1, "batch_size", "bertscore_layers")


def evaluate(config: EvalConfig) -> dict:
    """Generate (or read) captions for a split and score them; writes predictions and metrics."""
    directory = checkpoint.resolve(config.checkpoint)
    ckpt_config = checkpoint.read_config(directory)
    cache = feature_cache.read_cache(config.features)
    checkpoint.check_clip_match(
        ckpt_config,
        feature_cache.recorded_clip_model(cache.attrs),
        cache.embedding_dim,
        config.features,
        f"the checkpoint {directory}",
        feature_cache.recorded_clip_fingerprint(cache.attrs),
    )
    rows = cache.rows_of_split(config.split)
    all_refs = cache.references()
    unreferenced = [r for r in rows if not all_refs[r]]
    if unreferenced:
        log.warning("%d images of the split have no reference caption: left out", len(unreferenced))
        rows = np.array([r for r in rows if all_refs[r]], dtype=np.int64)
    if len(rows) == 0:
        raise ClipcapError(f"{config.features} has no captioned images in split '{config.split}'")
    image_ids = [cache.image_ids[r] for r in rows]
    references = {image_id: all_refs[r] for image_id, r in zip(image_ids, rows, strict=True)}
    predictions, retrieved_of = None, None
    if config.predictions:
        predictions = read_predictions(
            config.predictions, image_ids, "the evaluated split", partial=True
        )
    clip_model = None
    if config.clipscore:
        clip_model = cache_clip_model(cache.attrs, config.features, "--clipscore")
    device = resolve_device(config.device)
    if config.spice:
        check_spice()

    captioner = None
    if predictions is None:
        # Cached embeddings need no CLIP model: only the caption model is loaded.
        captioner = Captioner.from_checkpoint(
            directory, device, load_encoder=False, datastore=config.datastore
        )
        captioner.check_decode(config.decode)
    # Everything that can be checked is checked before the captioning work: the output folder too.
    out = results_folder(config, directory)
    make_folder(out, "--out", "the results")
    log_to_file(out / "evaluate.log")
    # A metric whose model cannot be loaded (offline, say) is skipped with a warning naming it.
    models = load_metric_models(
        config.bertscore,
        config.bertscore_model,
        config.bertscore_layers,
        clip_model,
        device,
    )
    if models.clip_text is not None:
        check_loaded_clip(cache.attrs, config.features, models.clip_text)
    if captioner is not None:
        embeddings = torch.from_numpy(cache.embeddings[rows])
        # An image's own captions are never retrieved: they are its references.
        retrieved = captioner.retrieve(embeddings, image_ids)
        captions = captioner.caption_embeddings(
            embeddings, config.decode, config.batch_size, progress=True, retrieved=retrieved
        )
        predictions = {
            image_id: c[0]["caption"] for image_id, c in zip(image_ids, captions, strict=True)
        }
        if retrieved is not None:
            retrieved_of = dict(zip(image_ids, retrieved, strict=True))
    row_of = dict(zip(image_ids, rows.tolist(), strict=True))
    embeddings = cache.embeddings[[row_of[k] for k in predictions]]
    metrics, skipped = score_captions(
        predictions, references, models, spice=config.spice, image_embeddings=embeddings
    )
    result = {
        "split": config.split,
        "images": len(predictions),
        # The captions of a --predictions file are not the checkpoint's: it is not credited.
        "checkpoint": None if config.predictions else str(directory),
        **({"predictions": str(config.predictions)} if config.predictions else {}),
        "features": str(config.features),
        "metrics": metrics,
        "skipped": skipped,
        # What a model card needs to report these scores: how the captions were made, and from
        # which save of the checkpoint (a later best replaces the folder's weights).
        "decode": None if config.predictions else asdict(config.decode),
        "checkpoint_epoch": ckpt_config.get("epoch"),
        "checkpoint_step": ckpt_config.get("step"),
    }
    write_json_atomic(
        out / "predictions.json",
        [
            {"image_id": coco_image_id(k), "caption": v}
            | ({"retrieved": retrieved_of[k]} if retrieved_of else {})
            for k, v in predictions.items()
        ],
    )
    write_json_atomic(out / "metrics.json", result)
    result["out"] = str(out)
    return result


def results_folder(config: EvalConfig, directory: Path) -> Path:
    """`--out`, or the default: the checkpoint's (`default_out`), or beside a --predictions file.

    Another system's captions (`--predictions`) never go to the run's own results, where their
    scores would replace the run's; nor may --out replace the predictions file it reads.
    """
    if config.out:
        out = Path(config.out)
    elif config.predictions:
        predictions = Path(config.predictions)
        out = predictions.with_name(f"{predictions.stem}-eval-{config.split}")
    else:
        return default_out(directory, config.split, config.checkpoint)
    if config.predictions and (out / "predictions.json").exists():
        with contextlib.suppress(OSError):
            if (out / "predictions.json").samefile(config.predictions):
                raise ClipcapError(
                    f"--out {out} holds the --predictions file, which the results would replace; "
                    "give another --out"
                )
    return out


def default_out(directory: Path, split: str, given: str | Path | None = None) -> Path:
    """Where results go without --out: never inside a checkpoint, which the next save replaces.

    `RUN/eval-SPLIT` for a run's best checkpoint, `RUN/eval-SPLIT-NAME` for its others (such as
    `last`), `FOLDER-eval-SPLIT` beside a checkpoint folder that is not in a run, and
    `USER--NAME-eval-SPLIT` in the working directory for a hub id (`given`), never in the hub
    cache.
    """
    if given is not None and is_hub_id(given):
        return Path(f"{str(given).replace('/', '--')}-eval-{split}")
    if directory.parent.name == "checkpoints":
        run = directory.parent.parent
        return run / (
            f"eval-{split}" if directory.name == "best" else f"eval-{split}-{directory.name}"
        )
    return directory.with_name(f"{directory.name}-eval-{split}")


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column text table."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items())
