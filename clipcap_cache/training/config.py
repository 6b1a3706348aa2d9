"""`TrainConfig`, every training setting, and `resolve_train_options`, which layers their sources.

Each field is declared once with its default, choices and help (`options.option`); the command
line's `clipcap train` options are made from these fields and `ModelConfig`'s. A run's settings
come from, in rising precedence: the defaults; the resumed run's `config.json` (with `--resume`)
or the `--init` checkpoint's model; a `--config` file; the options given explicitly.
"""

from dataclasses import dataclass, fields
from pathlib import Path

from clipcap_cache.checks import at_least, check_types, positive
from clipcap_cache.devices import DEVICE, PRECISIONS
from clipcap_cache.errors import ClipcapError
from clipcap_cache.evaluation.metrics import BERTSCORE, BERTSCORE_LAYERS, BERTSCORE_MODEL
from clipcap_cache.model import ModelConfig
from clipcap_cache.options import build, check_choices, option
from clipcap_cache.retrieval import DEFAULT_SEPARATOR, DEFAULT_TEMPLATE, check_template
from clipcap_cache.training import scst, trackers

OBJECTIVES = ("xe", "scst")
SEEDS = 2**63  # seeds are 0 .. SEEDS - 1, what torch's generators take as a signed 64-bit int
MAX_SAMPLES = 1000  # scst samples per image; SCST papers use 5 to 16


@dataclass
class TrainConfig:
    """Training settings; saved with the model config as the run's `config.json`."""

    features: str = option(help="HDF5 feature cache to train on.", argument=True)
    out: str = option(help="Run directory.")
    val_features: str | None = option(
        None, help="Validate on every image of this cache instead of the val split."
    )
    validate: bool = option(True, help="Validate each epoch.", flags=("--val/--no-val",))
    epochs: int = option(10, help="Passes over the training captions.")
    batch_size: int = option(
        40, help="Captions (images under scst) per micro-batch, in total across torchrun processes."
    )
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    lr: float = option(2e-5, help="Peak learning rate.")
    warmup_steps: int = option(5000, help="Linear warmup steps, then linear decay to zero.")
    weight_decay: float = option(0.01, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm.")
    max_caption_tokens: int = option(40, help="Longer captions are truncated (EOS still appended).")
    group_by_length: bool = option(
        True,
        help="Batch captions of similar length together (less padding); a run made without it "
        "resumes without it.",
        flags=("--group-by-length/--no-group-by-length",),
    )
    device: str = DEVICE.field()
    precision: str = option(
        "auto",
        help="Autocast precision; auto is bf16 where the GPU has it, else fp16, fp32 on the CPU.",
        choices=PRECISIONS,
    )
    seed: int = option(42, help="Random seed.")
    eval_images: int = option(500, help="Val images captioned for CIDEr-D and BERTScore.")
    bertscore: bool = BERTSCORE.field()
    bertscore_model: str = BERTSCORE_MODEL.field()
    bertscore_layers: int | None = BERTSCORE_LAYERS.field()
    save_every_steps: int = option(
        1000, help="Optimizer steps between mid-epoch resume points; 0: at epoch ends only."
    )
    log_every_steps: int = option(
        50,
        help="Optimizer steps between reports of the training loss and learning rate (to "
        "--report-to and train.log); each epoch's last step reports too.",
    )
    report_to: list[str] = option(
        default_factory=list,
        help="Report the run to an experiment tracker (repeat the option for several).",
        choices=trackers.REPORT_TO,
        metavar="TOOL",
        default_text="none",
    )
    compile: bool = option(False, help="torch.compile the model.")
    init: str | None = option(
        None,
        help="Start a new run from this checkpoint's weights (a folder, run or hub id; "
        "ignored on --resume).",
    )
    objective: str = option(
        "xe",
        help="Cross-entropy, or self-critical training (scst, after xe with --init).",
        choices=OBJECTIVES,
    )
    samples: int = option(5, help="scst: captions sampled per image.")
    baseline: str = option(
        "mean", help="scst: mean (of the image's other samples) or greedy.", choices=scst.BASELINES
    )
    reward: str = option("cider", help="scst: the reward.", choices=scst.REWARDS)
    cider_weight: float = option(1.0, help="scst: CIDEr-D weight in cider+clip.")
    clip_weight: float = option(1.0, help="scst: CLIP-S weight in cider+clip.")
    retrieval: int = option(
        0, help="K captions retrieved from --datastore into the prompt (SmallCap); 0: off."
    )
    datastore: str | None = option(
        None, help="Text file of captions to retrieve from (clipcap embed-text)."
    )
    retrieval_template: str = option(
        DEFAULT_TEMPLATE, help="The prompt; {captions} is replaced by the retrieved captions."
    )
    retrieval_separator: str = option(
        DEFAULT_SEPARATOR,
        help="What joins the retrieved captions in the prompt.",
        default_text=repr(DEFAULT_SEPARATOR),
    )
    noise_variance: float = option(
        0.0,
        help="Variance of Gaussian noise added to the input embeddings (CapDec: 0.016 when "
        "training from text alone).",
    )
    resume: bool = option(False, help="Continue an interrupted run.")
    replan_schedule: bool = option(
        False,
        help="With --resume: re-plan the learning-rate decay from the current step for changed "
        "--epochs, --batch-size, --grad-accum or --warmup-steps.",
    )
    overwrite: bool = option(False, help="Replace an existing run.")

    def __post_init__(self):
        check_types(self)
        at_least(self, 1, "epochs", "batch_size", "grad_accum", "max_caption_tokens")
        at_least(self, 1, "bertscore_layers", "samples", "log_every_steps")
        at_least(self, 0, "warmup_steps", "eval_images", "save_every_steps", "weight_decay")
        at_least(self, 0, "cider_weight", "clip_weight", "retrieval", "noise_variance")
        positive(self, "lr", "max_grad_norm")
        at_least(self, 0, "seed")
        if self.seed >= SEEDS:
            raise ClipcapError(f"--seed must be less than 2**63, not {self.seed}")
        if self.samples > MAX_SAMPLES:
            raise ClipcapError(
                f"--samples must be at most {MAX_SAMPLES}, not {self.samples}: every training "
                "image's captions are sampled together in one batch"
            )
        check_choices(self)
        trackers.check_report_to(self.report_to)
        if self.objective == "scst":
            if self.baseline == "mean" and self.samples < 2:
                raise ClipcapError("--baseline mean needs --samples 2 or more")
            if self.reward == "cider+clip" and self.cider_weight + self.clip_weight == 0:
                raise ClipcapError("--cider-weight and --clip-weight are both 0: no reward left")
            if self.validate and self.eval_images == 0:
                raise ClipcapError(
                    "--objective scst keeps the checkpoint with the best val CIDEr-D of greedy "
                    "captions: --eval-images must be at least 1 (or pass --no-val)"
                )
        if self.retrieval and not self.datastore:
            raise ClipcapError("--retrieval needs --datastore, the text file to retrieve from")
        if self.datastore and not self.retrieval:
            raise ClipcapError("--datastore is used with --retrieval K, the captions per prompt")
        if self.retrieval:
            check_template(self.retrieval_template)
            if self.objective == "scst":
                raise ClipcapError("--retrieval trains with --objective xe only")
        if self.noise_variance and self.objective == "scst":
            raise ClipcapError("--noise-variance applies to --objective xe only")
        if self.resume and self.overwrite:
            raise ClipcapError("--resume and --overwrite contradict each other: choose one")
        if self.replan_schedule and not self.resume:
            raise ClipcapError(
                "--replan-schedule re-plans a resumed run's schedule: pass it with --resume"
            )


# Taken from the explicit options only: a file never resumes, overwrites or moves a run.
_ONLY_EXPLICIT = ("out", "resume", "overwrite", "replan_schedule")
# Recorded in a run's config, but measured from the cache, never an option.
_DERIVED = ("clip_embedding_dim",)


def resolve_train_options(
    explicit: dict, config_file: str | Path | None = None
) -> tuple[TrainConfig, ModelConfig]:
    """The configs of a training run from its option sources, in rising precedence.

    1. The fields' defaults.
    2. With `resume`, the run's own `OUT/config.json`; otherwise, with `init`, the model of
       that checkpoint.
    3. `config_file`: flat (`{"lr": 1e-4}`) or a run's own `{"train": {...}, "model": {...}}`.
    4. `explicit`: the options the caller gave (on the command line: the flags typed), by field
       name. `out`, `resume`, `overwrite` and `replan_schedule` are taken from here alone.

    An option that no config has is refused with the file it came from.
    """
    known = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(ModelConfig)}
    unknown = set(explicit) - known
    if unknown:
        raise ClipcapError(f"unknown options {sorted(unknown)}")
    layers = []  # (values, where from), lowest precedence first
    out = explicit.get("out")
    saved = Path(out) / "config.json" if out is not None else None
    if explicit.get("resume") and saved is not None and saved.is_file():
        run_options = read_options_file(saved)
        # A run saved before grouping existed trained on the plain shuffle: it resumes so.
        run_options.setdefault("group_by_length", False)
        layers.append((run_options, saved))
    if config_file is not None:
        layers.append((read_options_file(config_file), Path(config_file)))
    for values, source in layers:
        unknown = set(values) - known - set(_DERIVED)
        if unknown:
            raise ClipcapError(f"{source}: unknown options {sorted(unknown)}")
    init = explicit.get("init")
    for values, _ in layers:
        init = explicit.get("init", values.get("init", init))
    if init is not None and not explicit.get("resume"):
        # The model is the --init checkpoint's, unless --config or a flag says otherwise.
        from clipcap_cache.checkpoint import read_config

        layers.insert(0, (read_config(init)["model"], init))
    values: dict = {}
    for layer, _ in layers:
        values.update({k: v for k, v in layer.items() if k not in _ONLY_EXPLICIT + _DERIVED})
    values.update(explicit)
    if "features" not in values or "out" not in values:
        raise ClipcapError("training needs a feature cache and --out, the run directory")
    return build(TrainConfig, values), build(ModelConfig, values)


def read_options_file(path: str | Path) -> dict:
    """A JSON file of options as one flat dict: `train` and `model` sections are merged in.

    Keys may be spelled like flags (`max-grad-norm`) or like fields (`max_grad_norm`).
    """
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
