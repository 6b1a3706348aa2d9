"""Caption metrics shared by evaluation and training: the COCO metrics and BERTScore.

BLEU-1..4, METEOR, ROUGE-L and CIDEr come from pycocoevalcap after its PTB tokenizer (Java), SPICE
on request. Without Java, METEOR is skipped and `cider.ptb_tokenize`, a Python copy of the PTB
rules, tokenizes instead. BERTScore comes from bert-score, each candidate scored against all of its
references.
"""

import contextlib
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from clipcap_cache.errors import ClipcapError
from clipcap_cache.evaluation.cider import ptb_tokenize as ptb_tokens
from clipcap_cache.evaluation.clipscore import clipscore, load_clip_text
from clipcap_cache.hub import quiet_transformers
from clipcap_cache.logs import third_party_output_to_log
from clipcap_cache.options import Option

log = logging.getLogger(__name__)
COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
# The BERTScore fields of every config that scores captions (train, evaluate, score).
BERTSCORE = Option(True, help="Score captions with BERTScore.")
BERTSCORE_MODEL = Option("roberta-large", help="BERTScore model: hub name or directory.")
BERTSCORE_LAYERS = Option(None, help="BERTScore layer, needed for models bert-score does not know.")


def java_available() -> bool:
    return shutil.which("java") is not None


def coco_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """Tokenize like the COCO evaluation: PTB tokenizer through Java, else a close fallback.

    pycocoevalcap hands the tokenizer one caption per line and reads one result per line back, so
    a line break of any kind inside a caption (carriage return, form feed, U+2028, ...) would
    shift every later caption onto another image's. Each caption's whitespace runs become one space
    first, which changes no token.
    """
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize(
            {k: [{"caption": " ".join(c.split())} for c in v] for k, v in captions.items()}
        )
    return {key: [" ".join(ptb_tokens(t)) for t in texts] for key, texts in captions.items()}


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
        check_spice()
    with third_party_output_to_log("pycocoevalcap"):
        gts = coco_tokenize(references)
        res = coco_tokenize({k: [v] for k, v in predictions.items()})
    scorers = [
        (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        (Rouge(), ["ROUGE_L"]),
        (Cider(), ["CIDEr"]),
    ]
    if java_available():
        scorers.insert(1, (SafeMeteor(), ["METEOR"]))
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
        if score is None:  # METEOR's Java process failed; it said why
            skipped += names
            continue
        values = score if isinstance(score, list) else [score]
        scores.update({n: float(v) for n, v in zip(names, values, strict=True)})
        if hasattr(scorer, "close"):
            scorer.close()
    return scores, skipped


MAX_METEOR_WORDS = 100  # of a caption, after tokenization: METEOR scores only the first ones


def _meteor_type():
    """`SafeMeteor`'s base, pycocoevalcap's METEOR, imported only when METEOR runs."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor


class SafeMeteor:
    """pycocoevalcap's METEOR, with captions cut to `MAX_METEOR_WORDS` and a failure contained.

    The Java scorer dies on a caption of some thousands of words, and pycocoevalcap's wrapper then
    raises while it holds its lock, which its `__del__` waits for at exit: the process never
    ends. Here each caption (prediction and references alike) is cut to its first 100 tokens,
    which no real caption reaches (COCO's average about 10), so the scorer never sees such a
    caption; and should it fail anyway, METEOR is skipped with a warning and the Java process is
    killed, never waited for under the lock.
    """

    def __init__(self):
        self.scorer = _meteor_type()()

    def compute_score(self, gts: dict, res: dict):
        cut = {k: [_first_words(c) for c in v] for k, v in gts.items()}
        try:
            return self.scorer.compute_score(
                cut, {k: [_first_words(c) for c in v] for k, v in res.items()}
            )
        except (ValueError, OSError) as e:  # a dead Java process: an empty or broken line
            log.warning("METEOR skipped: its Java scorer failed (%s)", e)
            return None, None
        finally:
            if self.scorer.lock.locked():
                self.scorer.lock.release()  # held by the failed call; __del__ acquires it

    def close(self) -> None:
        """End the Java process (pycocoevalcap's `__del__` does too, now that it cannot block)."""
        process = self.scorer.meteor_p
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(OSError):  # a pipe the dead process broke
                stream.close()


def _first_words(caption: str) -> str:
    words = caption.split()
    return " ".join(words[:MAX_METEOR_WORDS]) if len(words) > MAX_METEOR_WORDS else caption


def check_spice() -> None:
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


@dataclass
class MetricModels:
    """The models of the model-based metrics; None where a metric is off or could not load."""

    bertscorer: object | None = None
    clip_text: object | None = None  # `clipscore.ClipText`
    clipscore_wanted: bool = False


def load_metric_models(
    bertscore: bool,
    bertscore_model: str,
    bertscore_layers: int | None,
    clip_model: str | None,
    device,
) -> MetricModels:
    """Load BERTScore's model, and CLIP's text tower when `clip_model` is given for CLIPScore.

    A model that cannot be loaded (offline, say) is skipped with a warning naming its metric, so
    that no metric is lost to another's failure.
    """
    models = MetricModels(clipscore_wanted=clip_model is not None)
    if bertscore:
        models.bertscorer = _load_or_skip(
            make_bertscorer, "BERTScore", bertscore_model, bertscore_layers, device
        )
    if clip_model is not None:
        models.clip_text = _load_or_skip(load_clip_text, "CLIPScore", clip_model, device)
    return models


def score_captions(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    models: MetricModels,
    *,
    spice: bool = False,
    image_embeddings=None,
) -> tuple[dict[str, float], list[str]]:
    """Every metric whose inputs are here, for one caption per image; `evaluate` and `score` use it.

    The COCO metrics always run; BERTScore and CLIPScore run where `models` holds their model.
    CLIPScore also needs the images' embeddings, in the order of `predictions`. Returns the
    metrics and the names of those that could not run.
    """
    keys = list(predictions)
    candidates = [predictions[k] for k in keys]
    refs = [references[k] for k in keys]
    metrics, skipped = coco_metrics(predictions, {k: references[k] for k in keys}, spice)
    if models.bertscorer is not None:
        metrics.update(bertscore(models.bertscorer, candidates, refs))
    else:
        skipped.append("BERTScore")
    if models.clip_text is not None:
        metrics.update(clipscore(models.clip_text, image_embeddings, candidates, refs))
    elif models.clipscore_wanted:
        skipped.append("CLIPScore")
    return metrics, skipped


def _load_or_skip(loader, name: str, *args):
    """A metric's model, or None with a warning naming the metric when it cannot be loaded."""
    try:
        return loader(*args)
    except ClipcapError as e:
        log.warning("%s skipped: %s", name, e)
        return None
