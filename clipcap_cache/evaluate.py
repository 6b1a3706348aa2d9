"""Scoring captions the way the field does: COCO caption metrics and BERTScore.

    clipcap evaluate runs/coco --features data/coco_vitb32.h5 --split test

Captions are generated from the cached embeddings (no CLIP, no JPEG decoding) with the same
decoding code as `clipcap caption`, or read from an existing COCO results file (`--predictions`).
BLEU-1..4, METEOR, ROUGE-L and CIDEr come from pycocoevalcap after its PTB tokenizer, SPICE on
request; BERTScore comes from bert-score, each candidate scored against all its references.
"""

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipcap_cache import cache as feature_cache
from clipcap_cache import checkpoint
from clipcap_cache.captioner import Captioner
from clipcap_cache.devices import DEVICES, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import read_json, write_json_atomic
from clipcap_cache.generate import DecodeConfig
from clipcap_cache.hub import quiet_transformers
from clipcap_cache.logs import setup_logging, third_party_output_to_log
from clipcap_cache.validation import at_least, check_types, one_of

log = logging.getLogger(__name__)
COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
# The punctuation pycocoevalcap's PTB tokenizer drops, used when Java is missing.
_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


@dataclass
class EvalConfig:
    """Settings of one evaluation."""

    checkpoint: str  # checkpoint folder or run directory
    features: str  # HDF5 cache holding the images and references
    split: str = "test"  # train | val | test | all
    out: str | None = None  # output folder; default CHECKPOINT/eval-SPLIT
    predictions: str | None = None  # score this COCO results file instead of generating
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int = 64
    device: str = "auto"
    spice: bool = False
    bertscore: bool = True
    bertscore_model: str = "roberta-large"
    bertscore_layers: int | None = None

    def __post_init__(self):
        check_types(self)
        one_of(self, "split", ("train", "val", "test", "all"))
        one_of(self, "device", DEVICES)
        at_least(self, 1, "batch_size", "bertscore_layers")


def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """Tokenize like the COCO evaluation: PTB tokenizer through Java, else a close fallback."""
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize(
            {k: [{"caption": c} for c in v] for k, v in captions.items()}
        )
    tokenized = {}
    for key, texts in captions.items():
        tokenized[key] = [
            " ".join(w for w in re.findall(r"[\w']+|[^\w\s]", t.lower()) if w not in _PUNCTUATION)
            for t in texts
        ]
    return tokenized


def coco_metrics(
    predictions: dict[str, str], references: dict[str, list[str]], spice: bool = False
) -> tuple[dict[str, float], list[str]]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) of one caption per image.

    Returns the scores and the names of metrics that could not run here.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    skipped = []
    if spice:
        _check_spice()
    with third_party_output_to_log("pycocoevalcap"):
        gts = ptb_tokenize(references)
        res = ptb_tokenize({k: [v] for k, v in predictions.items()})
    scorers = [
        (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        (Rouge(), ["ROUGE_L"]),
        (Cider(), ["CIDEr"]),
    ]
    if java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.insert(1, (Meteor(), ["METEOR"]))
        if spice:
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), ["SPICE"]))
    else:
        skipped += ["METEOR", "PTB tokenizer"] + (["SPICE"] if spice else [])
        log.warning("Java not found: METEOR skipped, simple tokenization used instead of PTB")
    scores = {}
    for scorer, names in scorers:
        with third_party_output_to_log("pycocoevalcap"):
            score, _ = scorer.compute_score(gts, res)
        values = score if isinstance(score, list) else [score]
        scores.update({n: float(v) for n, v in zip(names, values, strict=True)})
        if hasattr(scorer, "close"):
            scorer.close()
    return scores, skipped


def _check_spice() -> None:
    import pycocoevalcap.spice as spice_package

    jar = Path(spice_package.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar"
    if not java_available():
        raise ClipcapError("--spice needs Java 8 on the PATH; install it or drop --spice")
    if not jar.is_file():
        raise ClipcapError(
            '--spice needs Stanford CoreNLP 3.6.0, a one-time download: run `python -c "from '
            'pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()"` '
            "where the network is reachable, or drop --spice"
        )
    version = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    if '"1.8' not in version:
        log.warning("SPICE is known to work with Java 8; found %s", version.splitlines()[0])


def make_bertscorer(model: str, layers: int | None, device: torch.device | str):
    """A reusable bert-score scorer; a local model directory needs `layers`."""
    from bert_score import BERTScorer
    from bert_score.utils import model2layers

    if layers is None and model not in model2layers:
        raise ClipcapError(
            f"bert-score does not know '{model}': pass --bertscore-layers N (the "
            "layer whose embeddings to use, e.g. 6 for all-MiniLM-L6-v2)"
        )
    is_dir = Path(model).expanduser().is_dir()
    try:
        with quiet_transformers():
            return BERTScorer(
                model_type=str(Path(model).expanduser()) if is_dir else model,
                num_layers=layers,
                device=str(device),
                batch_size=64,
            )
    except OSError:
        raise ClipcapError(
            f"cannot load BERTScore model '{model}': not a local directory and not reachable on "
            "the Hugging Face hub. Pass a local directory with --bertscore-model and "
            "--bertscore-layers, or --no-bertscore"
        ) from None


def bertscore(scorer, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean BERTScore P/R/F1, each candidate against all of its references."""
    with quiet_transformers():
        precision, recall, f1 = scorer.score(candidates, references)
    return {
        "bertscore_precision": precision.mean().item(),
        "bertscore_recall": recall.mean().item(),
        "bertscore_f1": f1.mean().item(),
    }


def evaluate(config: EvalConfig) -> dict:
    """Generate (or read) captions for a split and score them; writes predictions and metrics."""
    directory = checkpoint.resolve(config.checkpoint)
    ckpt_config = checkpoint.read_config(directory)
    cache = feature_cache.read_cache(config.features)
    checkpoint.check_clip_match(
        ckpt_config,
        cache.attrs.get("clip_model"),
        cache.embedding_dim,
        config.features,
        f"the checkpoint {directory}",
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
    predictions = None
    if config.predictions:
        predictions = read_predictions(config.predictions, set(image_ids))
    device = resolve_device(config.device)
    if config.spice:
        _check_spice()

    # Everything that can be checked is checked before the captioning work: the output folder too.
    out = Path(config.out) if config.out else directory / f"eval-{config.split}"
    if out.exists() and not out.is_dir():
        raise ClipcapError(f"--out {out} is a file; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipcapError(f"cannot create --out {out}: {e.strerror or e}") from None
    setup_logging(out / "evaluate.log")
    scorer = None
    if config.bertscore:
        scorer = make_bertscorer(config.bertscore_model, config.bertscore_layers, device)
    if predictions is None:
        # Cached embeddings need no CLIP model: only the caption model is loaded.
        captioner = Captioner.from_checkpoint(directory, device, load_encoder=False)
        captions = captioner.caption_embeddings(
            torch.from_numpy(cache.embeddings[rows]),
            config.decode,
            config.batch_size,
            progress=True,
        )
        predictions = {
            image_id: c[0]["caption"] for image_id, c in zip(image_ids, captions, strict=True)
        }
    scored_refs = {k: references[k] for k in predictions}
    metrics, skipped = coco_metrics(predictions, scored_refs, config.spice)
    if scorer is not None:
        keys = list(predictions)
        metrics.update(
            bertscore(scorer, [predictions[k] for k in keys], [scored_refs[k] for k in keys])
        )
    else:
        skipped.append("BERTScore")
    result = {
        "split": config.split,
        "images": len(predictions),
        "checkpoint": str(directory),
        "features": str(config.features),
        "metrics": metrics,
        "skipped": skipped,
    }
    write_json_atomic(
        out / "predictions.json",
        [{"image_id": _coco_id(k), "caption": v} for k, v in predictions.items()],
    )
    write_json_atomic(out / "metrics.json", result)
    result["out"] = str(out)
    return result


def read_predictions(path: str | Path, known_ids: set[str]) -> dict[str, str]:
    """Read a COCO results file `[{"image_id", "caption"}]`, keyed by image id as a string."""
    path = Path(path)
    rows = read_json(path, "predictions file")
    if not isinstance(rows, list):
        raise ClipcapError(f'{path}: expected a list of {{"image_id", "caption"}} objects')
    predictions = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image_id" not in row or "caption" not in row:
            raise ClipcapError(f"{path}: entry {i} needs 'image_id' and 'caption'")
        key = str(row["image_id"])
        if key not in known_ids:
            raise ClipcapError(f"{path}: image_id {row['image_id']} is not in the evaluated split")
        if not isinstance(row["caption"], str):
            raise ClipcapError(f"{path}: entry {i} has a caption that is not text")
        if key in predictions:
            raise ClipcapError(f"{path}: image_id {row['image_id']} has more than one caption")
        predictions[key] = row["caption"]
    if not predictions:
        raise ClipcapError(f"{path}: no predictions")
    if len(predictions) < len(known_ids):
        log.warning(
            "%s covers %d of the split's %d images: only those are scored",
            path,
            len(predictions),
            len(known_ids),
        )
    return predictions


def _coco_id(image_id: str):
    return int(image_id) if image_id.isdigit() else image_id


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column text table."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items())
