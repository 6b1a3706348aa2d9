"""The `clipcap` command line: a thin Typer layer over `clipcap_cache`.

Each command parses its options, builds the library's config objects and calls one library
function. Mistakes in the user's input (`ClipcapError`) are printed as one line and exit non-zero.
"""

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from clipcap_cache.errors import ClipcapError

app = typer.Typer(
    help="Image captioning with CLIP prefixes and GPT-2, trained from cached CLIP features.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _run(function, *args, **kwargs):
    """Call a library function, turning user errors and Ctrl-C into a message and an exit code."""
    from clipcap_cache.logs import setup_logging

    if not kwargs.pop("keep_logging", False):
        setup_logging()
    try:
        return function(*args, **kwargs)
    except ClipcapError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.secho("interrupted: run the same command again to resume", err=True, fg="yellow")
        raise typer.Exit(130) from None


Device = Annotated[str, typer.Option(help="auto | cpu | cuda | mps")]
Beams = Annotated[int, typer.Option(help="Beam width.")]
Greedy = Annotated[bool, typer.Option("--greedy", help="Greedy decoding.")]
Sample = Annotated[bool, typer.Option("--sample", help="Nucleus sampling.")]
NumCaptions = Annotated[int, typer.Option(help="Captions per image: top beams or samples.")]
MaxTokens = Annotated[int, typer.Option(help="New tokens at most.")]
TopP = Annotated[float, typer.Option(help="Nucleus mass for --sample.")]
Temperature = Annotated[float, typer.Option(help="Temperature for --sample.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
BertscoreModel = Annotated[str, typer.Option(help="BERTScore model: hub name or directory.")]
BertscoreLayers = Annotated[int | None, typer.Option(help="BERTScore layer, for unknown models.")]


@app.command("extract-features")
def extract_features(
    source: Annotated[
        str,
        typer.Argument(
            help="Annotation file (COCO, Karpathy, JSON lines, CSV), or WebDataset tar shards: "
            "a quoted brace pattern such as 'shards/{00000..00099}.tar', or a directory of tars."
        ),
    ],
    out: Annotated[Path, typer.Option(help="HDF5 cache to write.")],
    images: Annotated[
        Path | None,
        typer.Option(help="Image root of an annotation file (not used with tars)."),
    ] = None,
    format: Annotated[
        str, typer.Option(help="auto | coco | karpathy | jsonl | csv | webdataset")
    ] = "auto",
    split: Annotated[str, typer.Option(help="train | val | test | all")] = "all",
    split_default: Annotated[
        str, typer.Option(help="WebDataset: split of samples whose json names none.")
    ] = "train",
    clip_model: Annotated[
        str, typer.Option(help="CLIP hub name or directory.")
    ] = "openai/clip-vit-base-patch32",
    batch_size: Annotated[int, typer.Option(help="Images per encoder batch.")] = 64,
    num_workers: Annotated[int | None, typer.Option(help="Decoding workers.")] = None,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option(help="Storage dtype: float16 | float32")] = "float16",
    limit: Annotated[
        int | None, typer.Option(help="Only the first N images (annotation files).")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad image.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing cache.")
    ] = False,
    shard_size: Annotated[
        int, typer.Option(help="Images per crash-safe progress shard (a tar is one shard).")
    ] = 2048,
    image_processor: Annotated[
        str, typer.Option(help="CLIP preprocessing backend: torchvision (faster) | pil")
    ] = "torchvision",
):
    """Run frozen CLIP over a dataset once and cache the image embeddings in HDF5."""
    from clipcap_cache.data.images import default_num_workers
    from clipcap_cache.extraction.features import FeatureConfig, summary_dict
    from clipcap_cache.extraction.features import extract_features as run

    def go():
        config = FeatureConfig(
            annotations=source,
            images=None if images is None else str(images),
            out=str(out),
            format=format,
            split=split,
            split_default=split_default,
            clip_model=clip_model,
            batch_size=batch_size,
            num_workers=default_num_workers() if num_workers is None else num_workers,
            device=device,
            dtype=dtype,
            limit=limit,
            strict=strict,
            overwrite=overwrite,
            shard_size=shard_size,
            image_processor=image_processor,
        )
        return run(config)

    summary = _run(go)
    from clipcap_cache.distributed import is_main_process

    if not is_main_process():
        return
    if summary.already_complete:
        typer.echo(f"{out} is already complete ({summary.images_written} images): nothing to do")
        return
    info = summary_dict(summary)
    reasons = ", ".join(f"{n} {r}" for r, n in summary.failure_reasons.items()) or "none"
    uncaptioned = summary.images_without_captions
    typer.echo(
        f"wrote {out}: {summary.images_written} images, {summary.images_failed} skipped "
        f"({reasons})"
        + (f", {uncaptioned} without captions left out" if uncaptioned else "")
        + f"; {summary.seconds:.1f} s, {info['images_per_second']} images/s"
        + (f" (resumed after {summary.resumed_images})" if summary.resumed_images else "")
    )


@app.command()
def inspect(
    features: Annotated[Path, typer.Argument(help="HDF5 feature cache.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Summarise a feature cache: model, dimension, counts per split, failures, completeness."""
    from clipcap_cache.data.cache import describe

    info = _run(describe, features)
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(
        f"{info['path']}\n  complete:   {info['complete']}\n  clip model: {info['clip_model']}"
        f"\n  embeddings: {info['images']} x {info['embedding_dim']} {info['dtype']} "
        f"(image size {info['image_size']})\n  captions:   {info['captions']}"
        f"\n  source:     {info['source']}"
    )
    for split, counts in info["splits"].items():
        typer.echo(f"  {split:<5} {counts['images']} images, {counts['captions']} captions")
    reasons = ", ".join(f"{n} {r}" for r, n in info["failed_reasons"].items())
    typer.echo(f"  failed:     {info['failed']}" + (f" ({reasons})" if reasons else ""))


@app.command()
def train(
    ctx: typer.Context,
    features: Annotated[Path, typer.Argument(help="HDF5 feature cache to train on.")],
    out: Annotated[Path, typer.Option(help="Run directory.")],
    config: Annotated[
        Path | None, typer.Option(help="JSON file of options; flags override it.")
    ] = None,
    gpt2_model: Annotated[str, typer.Option(help="GPT-2 hub name or directory.")] = "gpt2",
    projector: Annotated[str, typer.Option(help="mlp | transformer")] = "mlp",
    prefix_length: Annotated[int, typer.Option(help="Prefix embeddings per image.")] = 10,
    normalize_prefix: Annotated[
        bool, typer.Option("--normalize-prefix", help="L2-normalise embeddings.")
    ] = False,
    freeze_layers: Annotated[
        int | None, typer.Option(help="Frozen GPT-2 blocks from the bottom (default: half).")
    ] = None,
    projector_layers: Annotated[int, typer.Option(help="Transformer projector depth.")] = 8,
    projector_heads: Annotated[int, typer.Option(help="Transformer projector heads.")] = 8,
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Captions (images under scst) per micro-batch, in total across torchrun processes."
        ),
    ] = 40,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-5,
    warmup_steps: Annotated[int, typer.Option()] = 5000,
    weight_decay: Annotated[float, typer.Option()] = 0.01,
    max_grad_norm: Annotated[float, typer.Option()] = 1.0,
    max_caption_tokens: Annotated[int, typer.Option()] = 40,
    group_by_length: Annotated[
        bool,
        typer.Option(
            "--group-by-length/--no-group-by-length",
            help="Batch captions of similar length together (xe): less padding, faster steps.",
        ),
    ] = False,
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    seed: Seed = 42,
    val_features: Annotated[Path | None, typer.Option(help="Validate on this cache.")] = None,
    validate: Annotated[bool, typer.Option("--val/--no-val", help="Validate each epoch.")] = True,
    eval_images: Annotated[
        int, typer.Option(help="Val images captioned for CIDEr-D and BERTScore.")
    ] = 500,
    bertscore: Annotated[bool, typer.Option("--bertscore/--no-bertscore")] = True,
    bertscore_model: BertscoreModel = "roberta-large",
    bertscore_layers: BertscoreLayers = None,
    save_every_steps: Annotated[int, typer.Option(help="Steps between resume points.")] = 1000,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    init: Annotated[
        Path | None, typer.Option(help="Start a new run from this checkpoint's weights.")
    ] = None,
    objective: Annotated[
        str, typer.Option(help="xe (cross-entropy) | scst (self-critical, after xe with --init).")
    ] = "xe",
    samples: Annotated[int, typer.Option(help="scst: captions sampled per image.")] = 5,
    baseline: Annotated[
        str, typer.Option(help="scst: mean (of the other samples) | greedy.")
    ] = "mean",
    reward: Annotated[str, typer.Option(help="scst: cider | clip | cider+clip.")] = "cider",
    cider_weight: Annotated[float, typer.Option(help="scst: CIDEr-D weight in cider+clip.")] = 1.0,
    clip_weight: Annotated[float, typer.Option(help="scst: CLIP-S weight in cider+clip.")] = 1.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run.")
    ] = False,
):
    """Train the projector and the unfrozen GPT-2 blocks from a feature cache."""
    from clipcap_cache.model import ModelConfig
    from clipcap_cache.training.config import TrainConfig
    from clipcap_cache.training.train import train as run

    def go():
        values = _resolve_options(ctx, out, config, resume)
        model_keys = {f.name for f in fields(ModelConfig)} - {"clip_embedding_dim"}
        train_keys = {f.name for f in fields(TrainConfig)}
        for key in ("features", "out", "val_features", "init"):
            values[key] = None if values[key] is None else str(values[key])
        model_config = ModelConfig(**{k: v for k, v in values.items() if k in model_keys})
        train_config = TrainConfig(**{k: v for k, v in values.items() if k in train_keys})
        return run(train_config, model_config)

    row = _run(go, keep_logging=True)
    typer.echo(json.dumps(row))


def _resolve_options(ctx: typer.Context, out: Path, config_file: Path | None, resume: bool):
    """Defaults < the resumed run's config, or the --init checkpoint's model < --config file < flags."""
    values = dict(ctx.params)
    values.pop("config")
    # Compared by name: typer may ship its own copy of click's ParameterSource enum.
    explicit = {
        k for k in values if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"
    }
    base: dict = {}
    saved = out / "config.json"
    if resume and saved.is_file():
        base.update(_flatten_config(saved))
    init = base.get("init", values.get("init"))
    if init is not None and not resume:
        # The model is the --init checkpoint's, unless a flag or --config says otherwise.
        from clipcap_cache.checkpoint import read_config

        base.update(read_config(init)["model"])
    if config_file is not None:
        base.update(_flatten_config(config_file))
    unknown = set(base) - set(values) - {"clip_embedding_dim"}
    if unknown:
        raise ClipcapError(f"{config_file}: unknown options {sorted(unknown)}")
    for key, value in base.items():
        if key in values and key not in explicit and key not in ("resume", "overwrite", "out"):
            values[key] = value
    return values


def _echo_scores(result: dict) -> None:
    """Print what `evaluate` and `score` measured: the image count, the table, what was skipped."""
    from clipcap_cache.evaluation.evaluate import format_table

    typer.echo(f"{result['images']} images, split {result['split']}")
    typer.echo(format_table(result["metrics"]))
    if result["skipped"]:
        typer.echo(f"skipped: {', '.join(result['skipped'])}")


def _flatten_config(path: Path) -> dict:
    from clipcap_cache.files import read_json

    data = read_json(path, "config file")
    if not isinstance(data, dict):
        raise ClipcapError(f"{path}: expected a JSON object of options")
    flat = {}
    for key, value in data.items():
        if key in ("train", "model") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key.replace("-", "_")] = value
    return flat


@app.command()
def caption(
    inputs: Annotated[list[str], typer.Argument(help="Image files, directories or globs.")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder or run directory.")],
    recursive: Annotated[bool, typer.Option("--recursive", help="Walk subfolders.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    beams: Beams = 5,
    greedy: Greedy = False,
    sample: Sample = False,
    num_captions: NumCaptions = 1,
    max_tokens: MaxTokens = 30,
    top_p: TopP = 0.9,
    temperature: Temperature = 1.0,
    seed: Seed = 0,
    device: Device = "auto",
    format: Annotated[str, typer.Option(help="text | json | jsonl | csv")] = "text",
    out: Annotated[Path | None, typer.Option(help="Write to this file.")] = None,
    num_workers: Annotated[int, typer.Option(help="Decoding workers.")] = 0,
):
    """Caption images with a trained checkpoint."""
    from clipcap_cache.inference.caption import (
        caption_images,
        check_output,
        expand_inputs,
        format_results,
        write_output,
    )
    from clipcap_cache.inference.generate import decode_config

    def go():
        decode = decode_config(
            beams, greedy, sample, num_captions, max_tokens, top_p, temperature, seed
        )
        check_output(None if out is None else str(out), format)
        paths = expand_inputs(inputs, recursive)
        check_output(None if out is None else str(out), format, paths)
        results = caption_images(paths, str(checkpoint), decode, batch_size, device, num_workers)
        write_output(format_results(results, format), None if out is None else str(out))
        return results

    results = _run(go)
    failed = [r for r in results if r.error]
    for r in failed:
        typer.secho(f"error: {r.image}: {r.error}", err=True, fg="red")
    if failed:
        raise typer.Exit(1)


@app.command()
def serve(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint folder or run directory.")],
    host: Annotated[
        str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: Device = "auto",
    max_batch: Annotated[int, typer.Option(help="Images per batched model call.")] = 16,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long a request waits for others to batch with.")
    ] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Images waiting at most; then 503.")] = 64,
    max_upload_mb: Annotated[float, typer.Option(help="Largest image upload, in MB.")] = 20.0,
    max_images: Annotated[int, typer.Option(help="Images per request at most.")] = 16,
):
    """Serve captions over HTTP (POST /caption, GET /health, a web page at /, API docs at /docs)."""
    from clipcap_cache.inference.serve import ServeConfig
    from clipcap_cache.inference.serve import serve as run

    def go():
        config = ServeConfig(
            checkpoint=str(checkpoint),
            host=host,
            port=port,
            device=device,
            max_batch=max_batch,
            batch_window_ms=batch_window_ms,
            max_queue=max_queue,
            max_upload_mb=max_upload_mb,
            max_images=max_images,
        )
        run(config)

    _run(go)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder or run directory.")],
    features: Annotated[Path, typer.Option(help="HDF5 cache with the images and references.")],
    split: Annotated[str, typer.Option(help="train | val | test | all")] = "test",
    out: Annotated[Path | None, typer.Option(help="Output folder [RUN/eval-SPLIT].")] = None,
    predictions: Annotated[Path | None, typer.Option(help="Score this COCO results file.")] = None,
    beams: Beams = 5,
    greedy: Greedy = False,
    sample: Sample = False,
    max_tokens: MaxTokens = 30,
    top_p: TopP = 0.9,
    temperature: Temperature = 1.0,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option(help="Images per generation batch.")] = 64,
    device: Device = "auto",
    spice: Annotated[bool, typer.Option("--spice", help="Also compute SPICE.")] = False,
    bertscore: Annotated[bool, typer.Option("--bertscore/--no-bertscore")] = True,
    bertscore_model: BertscoreModel = "roberta-large",
    bertscore_layers: BertscoreLayers = None,
    clipscore: Annotated[
        bool, typer.Option("--clipscore", help="Also CLIPScore and RefCLIPScore.")
    ] = False,
):
    """Score a checkpoint with BLEU, METEOR, ROUGE-L, CIDEr (SPICE) and BERTScore."""
    from clipcap_cache.evaluation.evaluate import EvalConfig
    from clipcap_cache.evaluation.evaluate import evaluate as run
    from clipcap_cache.inference.generate import decode_config

    def go():
        decode = decode_config(beams, greedy, sample, 1, max_tokens, top_p, temperature, seed)
        return run(
            EvalConfig(
                checkpoint=str(checkpoint),
                features=str(features),
                split=split,
                out=None if out is None else str(out),
                predictions=None if predictions is None else str(predictions),
                decode=decode,
                batch_size=batch_size,
                device=device,
                spice=spice,
                bertscore=bertscore,
                bertscore_model=bertscore_model,
                bertscore_layers=bertscore_layers,
                clipscore=clipscore,
            )
        )

    result = _run(go)
    _echo_scores(result)
    typer.echo(f"wrote {result['out']}/predictions.json and metrics.json")


@app.command()
def score(
    predictions: Annotated[
        Path, typer.Argument(help='COCO results file: [{"image_id", "caption"}].')
    ],
    references: Annotated[
        Path,
        typer.Option(help="COCO captions, Karpathy, JSON lines or CSV file, or a feature cache."),
    ],
    split: Annotated[str, typer.Option(help="train | val | test | all")] = "all",
    format: Annotated[str, typer.Option(help="auto | coco | karpathy | jsonl | csv")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Write OUT/metrics.json.")] = None,
    features: Annotated[
        Path | None, typer.Option(help="Feature cache with the images, for --clipscore.")
    ] = None,
    clipscore: Annotated[
        bool, typer.Option("--clipscore", help="Also CLIPScore and RefCLIPScore.")
    ] = False,
    spice: Annotated[bool, typer.Option("--spice", help="Also compute SPICE.")] = False,
    bertscore: Annotated[bool, typer.Option("--bertscore/--no-bertscore")] = True,
    bertscore_model: BertscoreModel = "roberta-large",
    bertscore_layers: BertscoreLayers = None,
    device: Device = "auto",
):
    """Score any captions against references: no checkpoint, no images."""
    from clipcap_cache.evaluation.score import ScoreConfig
    from clipcap_cache.evaluation.score import score as run

    def go():
        return run(
            ScoreConfig(
                predictions=str(predictions),
                references=str(references),
                split=split,
                format=format,
                out=None if out is None else str(out),
                features=None if features is None else str(features),
                clipscore=clipscore,
                spice=spice,
                bertscore=bertscore,
                bertscore_model=bertscore_model,
                bertscore_layers=bertscore_layers,
                device=device,
            )
        )

    result = _run(go)
    _echo_scores(result)
    if "out" in result:
        typer.echo(f"wrote {result['out']}/metrics.json")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo builds everything.")] = Path(
        "data/demo"
    ),
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over.")] = False,
):
    """Run the whole pipeline offline on synthetic data with tiny models."""
    from clipcap_cache.demo import run_demo

    _run(run_demo, workdir, fresh, echo=typer.echo)


if __name__ == "__main__":
    app()
