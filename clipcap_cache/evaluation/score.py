"""`clipcap score`: score any system's captions, with no checkpoint and no images.

    clipcap score results.json --references captions_val2014.json
    clipcap score results.json --references dataset_coco.json --split test --out scores/
    clipcap score results.json --references data/coco_vitb32.h5 --features data/coco_vitb32.h5 --clipscore

PREDICTIONS is a COCO results file, `[{"image_id", "caption"}]`. REFERENCES is an official COCO
captions file, a Karpathy file (`--split` picks its part), JSON lines or CSV, or a feature cache.
Image ids are matched as the reference file writes them: integers for COCO and Karpathy files, the
image path for JSON lines and CSV. Every image must have exactly one prediction and every
prediction a reference image; anything else is refused with one line.

The metrics are `metrics.score_captions`'s, the same as `clipcap evaluate`'s. A metric whose model
cannot be loaded (offline, say) is skipped with a warning naming it; the others are still
computed and written.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcap_cache.checks import check_types
from clipcap_cache.data import cache as feature_cache
from clipcap_cache.data.annotations import (
    FORMATS,
    SPLIT_CHOICES,
    read_annotations,
    select_split,
)
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
from clipcap_cache.files import make_folder, read_json, write_json_atomic
from clipcap_cache.options import check_choices, option

log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    """Settings of `clipcap score`."""

    predictions: str = option(help='COCO results file: [{"image_id", "caption"}].', argument=True)
    references: str = option(
        help="COCO captions, Karpathy, JSON lines or CSV file, or a feature cache."
    )
    split: str = option("all", help="Which split of the references.", choices=SPLIT_CHOICES)
    format: str = option("auto", help="Format of a references annotation file.", choices=FORMATS)
    out: str | None = option(None, help="Write OUT/metrics.json; without it, print only.")
    features: str | None = option(
        None, help="Feature cache with the images' embeddings, for --clipscore."
    )
    clipscore: bool = option(False, help="Also CLIPScore and RefCLIPScore.")
    spice: bool = option(False, help="Also compute SPICE.")
    bertscore: bool = BERTSCORE.field()
    bertscore_model: str = BERTSCORE_MODEL.field()
    bertscore_layers: int | None = BERTSCORE_LAYERS.field()
    device: str = DEVICE.field()

    def __post_init__(self):
        check_types(self)
        check_choices(self)
        if self.clipscore and not self.features:
            raise ClipcapError("--clipscore needs --features CACHE: the images' CLIP embeddings")


def read_references(path: str, split: str = "all", format: str = "auto") -> dict[str, list[str]]:
    """Reference captions by image id (as text), from an annotation file or a feature cache."""
    if Path(path).suffix in (".h5", ".hdf5"):
        cache = feature_cache.read_cache(path)
        all_refs = cache.references()
        rows = cache.rows_of_split(split)
        references = {cache.image_ids[r]: all_refs[r] for r in rows if all_refs[r]}
    else:
        records = select_split(read_annotations(path, format), split)
        references = {r.image_id: r.captions for r in records if r.captions}
    if not references:
        raise ClipcapError(f"{path} has no captioned images in split '{split}'")
    return references


def coco_image_id(key: str) -> int | str:
    """An image id as a results file gives it: an integer where the text is one, else the text.

    Only text that an integer writes back exactly is an integer (`"42"`), so zero-padded keys
    (`"000000001"`, img2dataset's) and other digits (`"²"`) stay text and round-trip.
    """
    if key.isascii() and key.isdigit() and str(int(key)) == key:
        return int(key)
    return key


def read_predictions(
    path: str | Path, image_ids, where: str = "the references", partial: bool = False
) -> dict[str, str]:
    """A COCO results file `[{"image_id", "caption"}]`, keyed by image id as text.

    Every prediction must name one of `image_ids` (text), once, with a text caption. Where all
    of those are integers (`coco_image_id`), as COCO's are, the file must give integers. Images
    without a prediction are an error, or with `partial` a warning (only the predicted ones are
    then scored).
    """
    path = Path(path)
    rows = read_json(path, "predictions file")
    if not isinstance(rows, list):
        raise ClipcapError(f'{path}: expected a list of {{"image_id", "caption"}} objects')
    image_ids = set(image_ids)
    integer_ids = all(isinstance(coco_image_id(key), int) for key in image_ids)
    predictions: dict[str, str] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image_id" not in row or "caption" not in row:
            raise ClipcapError(f"{path}: entry {i} needs 'image_id' and 'caption'")
        image_id = row["image_id"]
        if integer_ids and (not isinstance(image_id, int) or isinstance(image_id, bool)):
            raise ClipcapError(
                f"{path}: entry {i} has image_id {image_id!r}; the image ids of {where} are "
                "integers"
            )
        key = str(image_id)
        if key not in image_ids:
            raise ClipcapError(f"{path}: image_id {image_id} is not in {where}")
        if not isinstance(row["caption"], str):
            raise ClipcapError(f"{path}: entry {i} has a caption that is not text")
        if key in predictions:
            raise ClipcapError(f"{path}: image_id {image_id} has more than one caption")
        predictions[key] = row["caption"]
    if not predictions:
        raise ClipcapError(f"{path}: no predictions")
    missing = [k for k in image_ids if k not in predictions]
    if missing and not partial:
        raise ClipcapError(
            f"{path}: {len(missing)} of the {len(image_ids)} images of {where} have no "
            f"prediction (first: {sorted(missing)[0]}); use --split to score a part"
        )
    if missing:
        log.warning(
            "%s covers %d of the split's %d images: only those are scored",
            path,
            len(predictions),
            len(image_ids),
        )
    return predictions


def score(config: ScoreConfig) -> dict:
    """Score a predictions file; writes `OUT/metrics.json` when `out` is given."""
    references = read_references(config.references, config.split, config.format)
    predictions = read_predictions(config.predictions, references)
    embeddings = clip_model = None
    if config.clipscore:
        cache = feature_cache.read_cache(config.features)
        clip_model = cache_clip_model(cache.attrs, config.features, "--clipscore")
        row_of = {image_id: row for row, image_id in enumerate(cache.image_ids)}
        unknown = [k for k in predictions if k not in row_of]
        if unknown:
            raise ClipcapError(
                f"{config.features} has no image {unknown[0]}: it cannot give CLIPScore"
            )
        embeddings = cache.embeddings[np.array([row_of[k] for k in predictions])]
    device = resolve_device(config.device)
    if config.spice:
        check_spice()
    out = Path(config.out) if config.out else None
    if out is not None:
        make_folder(out, "--out", "the results")
    models = load_metric_models(
        config.bertscore, config.bertscore_model, config.bertscore_layers, clip_model, device
    )
    if models.clip_text is not None:
        check_loaded_clip(cache.attrs, config.features, models.clip_text)
    metrics, skipped = score_captions(
        predictions, references, models, spice=config.spice, image_embeddings=embeddings
    )
    result = {
        "predictions": str(config.predictions),
        "references": str(config.references),
        "split": config.split,
        "images": len(predictions),
        "metrics": metrics,
        "skipped": skipped,
    }
    if out is not None:
        write_json_atomic(out / "metrics.json", result)
        result["out"] = str(out)
    return result
