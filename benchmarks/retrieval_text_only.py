"""Retrieval-augmented and text-only captioning on the pretrained tiny testbed, same budget for all.

    python benchmarks/retrieval_text_only.py            # about 10 minutes on 2 CPU cores

On the synthetic shapes with the pretrained tiny CLIP and GPT-2 (`clipcap_cache/testbed.py`):

1. plain training against retrieval-augmented training (`--retrieval 4`), GPT-2 fine-tuned;
2. SmallCap's setting (every GPT-2 block frozen: only the projector trains) against fine-tuning,
   with and without retrieval;
3. a datastore swap: the retrieval model, trained on the shapes' own colour names, captions the
   test images with a datastore of a second domain that names the colours otherwise (crimson,
   emerald, azure, golden: words never seen in training). Counted: how often a caption uses a
   new-domain word, and how often the right one;
4. training from text alone (`clipcap train TEXT.h5 --noise-variance 0.016`) against paired
   training.

Every run has the same budget (epochs, batch, learning rate, seed). Scored on the test split:
CIDEr (pycocoevalcap), CLIPScore with the testbed CLIP, and the share of captions that name the
image's colour and shape. Results go to benchmarks/results/retrieval_text_only.json.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, machine  # noqa: E402

from clipcap_cache.data import cache as feature_cache  # noqa: E402
from clipcap_cache.data.annotations import read_annotations  # noqa: E402
from clipcap_cache.demo import COLORS, SHAPES, make_shapes_dataset  # noqa: E402
from clipcap_cache.evaluation.evaluate import EvalConfig, evaluate  # noqa: E402
from clipcap_cache.extraction.features import FeatureConfig, extract_features  # noqa: E402
from clipcap_cache.extraction.text import TextConfig, embed_text  # noqa: E402
from clipcap_cache.inference.generate import DecodeConfig  # noqa: E402
from clipcap_cache.model import ModelConfig  # noqa: E402
from clipcap_cache.testbed import build_testbed  # noqa: E402
from clipcap_cache.training.config import TrainConfig  # noqa: E402
from clipcap_cache.training.train import train  # noqa: E402

NEW_COLORS = {"red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden"}


def prepare(workdir: Path, train_images: int) -> dict:
    """The testbed, the shapes cache, and the text files: train datastore, all, other domain."""
    clip_dir, gpt2_dir = build_testbed(workdir / "models")
    counts = {"train": train_images, "val": 40, "test": 80}
    annotations = make_shapes_dataset(workdir / "shapes", counts, seed=7)
    features = workdir / "shapes.h5"
    extract_features(
        FeatureConfig(
            annotations=str(annotations),
            images=str(workdir / "shapes"),
            out=str(features),
            clip_model=str(clip_dir),
            num_workers=0,
        )
    )
    paths = {"clip": clip_dir, "gpt2": gpt2_dir, "features": features}
    for name, split in (("datastore", "train"), ("text", "all")):
        paths[name] = workdir / f"{name}.h5"
        embed_text(TextConfig(source=str(features), out=str(paths[name]), split=split))
    # The second domain: the training images' captions with other colour names.
    other = workdir / "other_domain.jsonl"
    with open(other, "w") as f:
        for record in read_annotations(annotations):
            if record.split != "train":
                continue
            for caption in record.captions:
                renamed = re.sub(
                    r"\b(red|green|blue|yellow)\b", lambda m: NEW_COLORS[m.group(1)], caption
                )
                f.write(json.dumps({"image": record.path, "caption": renamed}) + "\n")
    paths["other_datastore"] = workdir / "other_datastore.h5"
    embed_text(
        TextConfig(source=str(other), out=str(paths["other_datastore"]), clip_model=str(clip_dir))
    )
    return paths


def run(workdir: Path, name: str, paths: dict, args, features=None, **settings) -> Path:
    out = workdir / "runs" / name
    model = {k: settings.pop(k) for k in ("freeze_layers",) if k in settings}
    train(
        TrainConfig(
            features=str(features or paths["features"]),
            out=str(out),
            epochs=args.epochs,
            batch_size=32,
            lr=args.lr,
            warmup_steps=20,
            seed=0,
            device="cpu",
            bertscore=False,
            eval_images=0,
            save_every_steps=0,
            overwrite=True,
            **settings,
        ),
        ModelConfig(gpt2_model=str(paths["gpt2"]), prefix_length=4, **model),
    )
    return out


def score(run_dir: Path, paths: dict, datastore: Path | None = None) -> dict:
    """CIDEr and CLIPScore on the test split, and how often captions name colour and shape."""
    out = run_dir / f"eval-{datastore.stem if datastore else 'own'}"
    result = evaluate(
        EvalConfig(
            checkpoint=str(run_dir),
            features=str(paths["features"]),
            out=str(out),
            decode=DecodeConfig(strategy="greedy"),
            device="cpu",
            bertscore=False,
            clipscore=True,
            datastore=str(datastore) if datastore else None,
        )
    )
    cache = feature_cache.read_cache(paths["features"])
    references = dict(zip(cache.image_ids, cache.references(), strict=True))
    predictions = json.loads((out / "predictions.json").read_text())
    right = new_words = right_new = 0
    for p in predictions:
        reference = references[str(p["image_id"])][0]
        colour = next(c for c in COLORS if re.search(rf"\b{c}\b", reference))
        shape = next(s for s in SHAPES if s in reference)
        words = p["caption"].split()
        right += colour in words and shape in words
        new_words += any(w in NEW_COLORS.values() for w in words)
        right_new += NEW_COLORS[colour] in words
    n = len(predictions)
    return {
        "cider": round(result["metrics"]["CIDEr"], 3),
        "clipscore": round(result["metrics"]["clipscore"], 3),
        "colour_and_shape": round(right / n, 3),
        "new_domain_word": round(new_words / n, 3),
        "right_new_colour": round(right_new / n, 3),
        "example": predictions[0],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/clipcap-retrieval-bench")
    parser.add_argument("--train-images", type=int, default=360)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--runs", default="", help="Comma-separated run folders (plain,rag,...; default: all)."
    )
    args = parser.parse_args()
    workdir = Path(args.workdir)
    started = time.perf_counter()
    paths = prepare(workdir, args.train_images)
    retrieval = {"retrieval": 4, "datastore": str(paths["datastore"])}
    # One caption as the whole prompt: a short context, in the words the testbed LM knows.
    short = {
        "retrieval": 1,
        "datastore": str(paths["datastore"]),
        "retrieval_template": "{captions}",
    }
    plans = {
        "plain, fine-tuned": ("plain", dict(freeze_layers=0)),
        "retrieval, fine-tuned": ("rag", dict(freeze_layers=0, **retrieval)),
        "plain, projector only": ("plain-frozen", dict(freeze_layers=2)),
        "retrieval, projector only": ("rag-frozen", dict(freeze_layers=2, **retrieval)),
        "text only (noise 0.016), fine-tuned": (
            "text", dict(features=paths["text"], freeze_layers=0, noise_variance=0.016)
        ),
        "text only (noise 0.002), fine-tuned": (
            "text-0.002", dict(features=paths["text"], freeze_layers=0, noise_variance=0.002)
        ),
        "retrieval K=1, bare prompt, fine-tuned": ("rag-short", dict(freeze_layers=0, **short)),
    }  # fmt: skip
    chosen = args.runs.split(",") if args.runs else [folder for folder, _ in plans.values()]
    results = {}
    for name, (folder, settings) in plans.items():
        if folder not in chosen:
            continue
        out = run(workdir, folder, paths, args, **settings)
        results[name] = score(out, paths)
        if "retrieval" in settings:
            results[f"{name}, other domain's datastore"] = score(
                out, paths, paths["other_datastore"]
            )
    RESULTS.mkdir(exist_ok=True)
    saved = RESULTS / "retrieval_text_only.json"
    if args.runs and saved.exists():  # a partial rerun keeps the other runs' rows
        results = {**json.loads(saved.read_text())["results"], **results}
    report = {
        "machine": machine(),
        "train_images": args.train_images,
        "epochs": args.epochs,
        "lr": args.lr,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    saved.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
