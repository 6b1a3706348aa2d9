"""The `clipcap` command line: a thin Typer layer over `clipcap_cache`.

Each command's options are made from the fields of the library's config dataclasses
(`clipcap_cache.options`): the defaults, types, choices and help text that `--help` shows are
the configs' own. A command builds its configs from the parsed values and calls one library
function. Options that only the command line has (`--config`, `--json`, ...) are declared the
same way, in small dataclasses here. Mistakes in the user's input (`ClipcapError`) are printed
as one line and exit non-zero.

A command's options, and the library modules that define them, are loaded only when that
command runs or shows its help, so `clipcap --help` starts without importing torch.
"""

import contextlib
import inspect as signatures
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from clipcap_cache.errors import ClipcapError
from clipcap_cache.options import MISSING, NamedOption, build, option, options_of

# ------------------------------------------------------------------ building commands


@dataclass(frozen=True)
class _Command:
    function: Callable  # called with the parsed values as one dict (and the context, if asked)
    options: Callable[[], list[NamedOption]]  # imports what it needs when called
    context: bool


_COMMANDS: dict[str, _Command] = {}


def command(options: Callable[[], list[NamedOption]], name: str | None = None, context=False):
    """Register a command whose Typer parameters are `options()`; see the module docstring."""

    def register(function):
        _COMMANDS[name or function.__name__.replace("_", "-")] = _Command(
            function, options, context
        )
        return function

    return register


def _parameter(opt: NamedOption) -> signatures.Parameter:
    """One Typer parameter, `name: Annotated[type, typer.Option(...)] = default`, from an option."""
    spec = opt.spec
    kind = spec.cli_type or opt.annotation
    default = opt.default
    if default is None:
        kind = kind | None
    show_default = spec.default_text or True
    if spec.argument:
        info = typer.Argument(
            help=spec.help_text(), metavar=spec.metavar, show_default=show_default
        )
    else:
        info = typer.Option(
            *opt.flags, help=spec.help_text(), metavar=spec.metavar, show_default=show_default
        )
    return signatures.Parameter(
        opt.name,
        signatures.Parameter.KEYWORD_ONLY,
        default=signatures.Parameter.empty if default is MISSING else default,
        annotation=Annotated[kind, info],
    )


def _click_command(name: str) -> TyperCommand:
    """Build a registered command, with Typer, from its options."""
    entry = _COMMANDS[name]
    parameters = [_parameter(opt) for opt in entry.options()]
    if entry.context:
        kind = signatures.Parameter.KEYWORD_ONLY
        parameters.insert(0, signatures.Parameter("ctx", kind, annotation=typer.Context))

    def callback(**values):
        if entry.context:
            return entry.function(values.pop("ctx"), values)
        return entry.function(values)

    callback.__signature__ = signatures.Signature(parameters)
    callback.__doc__ = entry.function.__doc__
    single = typer.Typer(
        add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
    )
    single.command(name)(callback)
    return typer.main.get_command(single)


class _LazyCommands(Mapping):
    """The group's commands by name, each built when first looked up (a read-only mapping)."""

    def __init__(self):
        self.built: dict[str, TyperCommand] = {}
        self.listing = False  # while `clipcap --help` lists them: their help line is enough

    def __getitem__(self, name: str) -> TyperCommand:
        entry = _COMMANDS[name]
        if self.listing:
            return TyperCommand(name, help=entry.function.__doc__)
        if name not in self.built:
            self.built[name] = _click_command(name)
        return self.built[name]

    def __iter__(self):
        return iter(_COMMANDS)

    def __len__(self):
        return len(_COMMANDS)


class _LazyGroup(TyperGroup):
    """The `clipcap` group, whose commands are built (and their modules imported) on first use."""

    def __init__(self, **settings):
        super().__init__(**settings)
        self.commands = _LazyCommands()

    def list_commands(self, ctx):
        return list(self.commands)  # names only: nothing is built

    def format_help(self, ctx, formatter):
        self.commands.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.commands.listing = False


app = typer.Typer(
    cls=_LazyGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()  # a group of commands needs a callback: it does nothing
def _group():
    """Image captioning with CLIP prefixes and GPT-2, trained from cached CLIP features."""


@contextlib.contextmanager
def _reported(resume_hint: str | None = None):
    """Run a command's library calls, turning user errors and Ctrl-C into a message and an exit code.

    The console's logging is set up here, once, for every command; library stages that keep a
    log file add it themselves. `resume_hint` says how to continue after Ctrl-C, where a command
    can.
    """
    from clipcap_cache.distributed import is_main_process
    from clipcap_cache.logs import setup_logging
    from clipcap_cache.preemption import Preempted

    setup_logging()
    try:
        yield
    except ClipcapError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(1) from None
    except Preempted as e:  # SIGTERM or SIGUSR1: the position is saved
        if is_main_process():
            typer.secho(str(e), err=True, fg="yellow")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        message = "interrupted" + (f": {resume_hint}" if resume_hint else "")
        typer.secho(message, err=True, fg="yellow")
        raise typer.Exit(130) from None


def _given(ctx: typer.Context, values: dict) -> dict:
    """The values the user typed (not the defaults Typer filled in)."""
    # Compared by name: typer may ship its own copy of click's ParameterSource enum.
    return {
        k: v
        for k, v in values.items()
        if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"
    }


# ------------------------------------------------------------------ the commands


def _feature_options():
    from clipcap_cache.extraction.features import FeatureConfig

    return options_of(FeatureConfig)


@command(_feature_options, name="extract-features")
def extract_features(values: dict):
    """Run frozen CLIP over a dataset once and cache the image embeddings in HDF5."""
    from clipcap_cache.distributed import is_main_process
    from clipcap_cache.extraction.features import FeatureConfig, summary_dict
    from clipcap_cache.extraction.features import extract_features as run

    with _reported(resume_hint="run the same command again to resume"):
        config = build(FeatureConfig, values)
        summary = run(config)
    if not is_main_process():
        return
    out = config.out
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


def _text_options():
    from clipcap_cache.extraction.text import TextConfig

    return options_of(TextConfig)


@command(_text_options, name="embed-text")
def embed_text(values: dict):
    """Embed the captions of an annotation file or a cache with CLIP's text tower, once."""
    from clipcap_cache.extraction.text import TextConfig
    from clipcap_cache.extraction.text import embed_text as run

    with _reported(resume_hint="run the same command again to resume"):
        summary = run(build(TextConfig, values))
    if summary["already_complete"]:
        typer.echo(f"{summary['out']} is already complete ({summary['captions']} captions)")
    else:
        typer.echo(f"wrote {summary['out']}: {summary['captions']} captions")


@dataclass
class InspectOptions:
    """What `clipcap inspect` takes."""

    features: str = option(help="HDF5 feature cache.", argument=True)
    json_output: bool = option(False, help="Print JSON.", flags=("--json",))


@command(lambda: options_of(InspectOptions))
def inspect(values: dict):
    """Summarise a feature cache: model, dimension, counts per split, failures, completeness."""
    from clipcap_cache.data.cache import describe

    options = InspectOptions(**values)
    with _reported():
        info = describe(options.features)
    if options.json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(
        f"{info['path']}\n  complete:   {info['complete']}\n  kind:       {info['kind']}"
        f"\n  clip model: {info['clip_model']}"
        f"\n  embeddings: {info['images']} x {info['embedding_dim']} {info['dtype']} "
        f"(image size {info['image_size']})\n  captions:   {info['captions']}"
        f"\n  source:     {info['source']}"
    )
    for split, counts in info["splits"].items():
        typer.echo(f"  {split:<5} {counts['images']} images, {counts['captions']} captions")
    reasons = ", ".join(f"{n} {r}" for r, n in info["failed_reasons"].items())
    typer.echo(f"  failed:     {info['failed']}" + (f" ({reasons})" if reasons else ""))


@dataclass
class ConfigFileOption:
    """`clipcap train --config`: options from a JSON file, below the flags."""

    config: str | None = option(None, help="JSON file of options; flags override it.")


def _train_options():
    from clipcap_cache.model import ModelConfig
    from clipcap_cache.training.config import TrainConfig

    return options_of(TrainConfig) + options_of(ModelConfig) + options_of(ConfigFileOption)


@command(_train_options, context=True)
def train(ctx: typer.Context, values: dict):
    """Train the projector and the unfrozen GPT-2 blocks from a feature cache."""
    from clipcap_cache.training.config import resolve_train_options
    from clipcap_cache.training.train import train as run

    config_file = values.pop("config")
    with _reported("add --resume to the same command to continue from the last checkpoint"):
        train_config, model_config = resolve_train_options(_given(ctx, values), config_file)
        row = run(train_config, model_config)
    typer.echo(json.dumps(row))


def _decode_options(*exclude):
    from clipcap_cache.inference.generate import DecodeConfig, StrategyFlags

    return options_of(StrategyFlags) + options_of(DecodeConfig, exclude=exclude)


def _caption_options():
    from clipcap_cache.inference.caption import CaptionConfig

    return options_of(CaptionConfig) + _decode_options()


@command(_caption_options)
def caption(values: dict):
    """Caption images with a trained checkpoint."""
    from clipcap_cache.inference.caption import CaptionConfig
    from clipcap_cache.inference.caption import caption as run

    with _reported():
        results = run(build(CaptionConfig, {**values, "decode": _decode(values)}))
    failed = [r for r in results if r.error]
    for r in failed:
        typer.secho(f"error: {r.image}: {r.error}", err=True, fg="red")
    if failed:
        raise typer.Exit(1)


def _serve_options():
    from clipcap_cache.inference.serve import ServeConfig

    return options_of(ServeConfig)


@command(_serve_options)
def serve(values: dict):
    """Serve captions over HTTP (POST /caption, GET /health, a web page at /, API docs at /docs)."""
    from clipcap_cache.inference.serve import ServeConfig
    from clipcap_cache.inference.serve import serve as run

    with _reported():
        run(build(ServeConfig, values))


def _evaluate_options():
    from clipcap_cache.evaluation.evaluate import EvalConfig

    return options_of(EvalConfig) + _decode_options("num_captions")


@command(_evaluate_options)
def evaluate(values: dict):
    """Score a checkpoint with BLEU, METEOR, ROUGE-L, CIDEr (SPICE) and BERTScore."""
    from clipcap_cache.evaluation.evaluate import EvalConfig
    from clipcap_cache.evaluation.evaluate import evaluate as run

    with _reported():
        result = run(build(EvalConfig, {**values, "decode": _decode(values)}))
    _echo_scores(result)
    typer.echo(f"wrote {result['out']}/predictions.json and metrics.json")


def _decode(values: dict):
    """The `DecodeConfig` of a command's parsed values (its decoding options and switches)."""
    from dataclasses import fields

    from clipcap_cache.inference.generate import DecodeConfig, decode_config

    names = {f.name for f in fields(DecodeConfig)} | {"greedy", "sample"}
    return decode_config(**{k: v for k, v in values.items() if k in names})


def _score_options():
    from clipcap_cache.evaluation.score import ScoreConfig

    return options_of(ScoreConfig)


@command(_score_options)
def score(values: dict):
    """Score any captions against references: no checkpoint, no images."""
    from clipcap_cache.evaluation.score import ScoreConfig
    from clipcap_cache.evaluation.score import score as run

    with _reported():
        result = run(build(ScoreConfig, values))
    _echo_scores(result)
    if "out" in result:
        typer.echo(f"wrote {result['out']}/metrics.json")


def _echo_scores(result: dict) -> None:
    """Print what `evaluate` and `score` measured: the image count, the table, what was skipped."""
    from clipcap_cache.evaluation.evaluate import format_table

    typer.echo(f"{result['images']} images, split {result['split']}")
    typer.echo(format_table(result["metrics"]))
    if result["skipped"]:
        typer.echo(f"skipped: {', '.join(result['skipped'])}")


def _export_options():
    from clipcap_cache.sharing.export import ExportConfig

    return options_of(ExportConfig)


@command(_export_options)
def export(values: dict):
    """Write a checkpoint as a self-contained folder with a model card, ready for the hub."""
    from clipcap_cache.sharing.export import ExportConfig
    from clipcap_cache.sharing.export import export as run

    with _reported():
        out = run(build(ExportConfig, values))
    files = [p for p in out.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    typer.echo(f"wrote {out}: {len(files)} files, {size / 1e6:.1f} MB, model card {out}/README.md")


def _push_options():
    from clipcap_cache.sharing.push import PushConfig

    return options_of(PushConfig)


@command(_push_options)
def push(values: dict):
    """Export a checkpoint and upload it to the Hugging Face hub (huggingface_hub's login)."""
    from clipcap_cache.sharing.push import PushConfig
    from clipcap_cache.sharing.push import push as run

    with _reported():
        result = run(build(PushConfig, values))
    typer.echo(
        f"pushed {len(result.files)} files to {result.url} (revision {result.revision}); "
        f"load it with --checkpoint {result.repo}"
    )


def _demo_options():
    from clipcap_cache.demo import DEFAULT_WORKDIR

    @dataclass
    class DemoOptions:
        workdir: str = option(DEFAULT_WORKDIR, help="Where the demo builds everything.")
        fresh: bool = option(False, help="Start over.")

    return options_of(DemoOptions)


@command(_demo_options)
def demo(values: dict):
    """Run the whole pipeline offline on synthetic data with tiny models."""
    from clipcap_cache.demo import run_demo

    with _reported():
        run_demo(values["workdir"], values["fresh"], echo=typer.echo)


if __name__ == "__main__":
    app()
