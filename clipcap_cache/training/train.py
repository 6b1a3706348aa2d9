"""`train`: set a run up from a feature cache and fit it, the entry point of stage 2.

    clipcap train data/coco_vitb32.h5 --out runs/coco
    torchrun --nproc-per-node 8 --no-python clipcap train data/coco_vitb32.h5 --out runs/coco

`train` is a short sequence of named steps, each a function of this module taking what it
needs: `resolve_settings` (absolute paths, resolved hub names, the cache's embedding width),
`check_inputs` (caches, device, the run directory against --resume/--overwrite, --init, the
schedule), `load_models` (tokenizer, model, the CLIP reward's text tower), `build_objective` and
`build_validation`, `restore` (a resumed run's weights, optimizer, random number generators and
position), `prepare_run` (the first write to the run directory, the experiment trackers of
`--report-to`, then its log file) and `fit` (the epochs, each followed by validation and the best
and last checkpoints). Every step that can fail comes before `prepare_run`, so a failed start
leaves an old run as it was, even under --overwrite; the lines logged before the log file exists
are held and written into it.

The CLIP image encoder is never loaded: the cached embeddings are memory-mapped, and every
caption is tokenized once into a file beside the cache that is memory-mapped too
(`data/tokens.py`), so the processes of a node share one copy of the data and a cache may be
bigger than RAM.

The parts live beside it in `training/`: the objectives (`objectives.CrossEntropy`,
`scst.SelfCritical`), one epoch (`loop.train_one_epoch`), validation (`validation.validate`), the
optimizer step (`optimization.py`), how far a run has got (`state.TrainState`) and the run
directory's checks and checkpoints (`run_dir.py`). Under torchrun the model is wrapped in
DistributedDataParallel and `batch_size` is the global batch: every rank takes every N-th sample
of the same shuffled batch (see `clipcap_cache/distributed.py`).

The run directory holds `config.json` (the resolved settings), `train.log`, `metrics.jsonl` (one row
per epoch), `plots/*.png` and `checkpoints/{best,last}/` (see `clipcap_cache/checkpoint.py`), and
the files of the `--report-to` trackers (`training/trackers.py`). The
last checkpoint also carries `train_state.pt`, written at every epoch end and every
`save_every_steps` optimizer steps, so `--resume` continues a killed run; on the CPU with the same
seed it reaches the same weights as a run that was never interrupted.
"""

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from clipcap_cache import checkpoint, distributed
from clipcap_cache.data import cache as feature_cache
from clipcap_cache.data.annotations import TRAIN
from clipcap_cache.devices import autocast_dtype, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.evaluation.cider import CiderD
from clipcap_cache.evaluation.clipscore import (
    ClipText,
    cache_clip_model,
    check_loaded_clip,
    load_clip_text,
)
from clipcap_cache.files import exclusive_lock, refuse_file
from clipcap_cache.hub import resolve_name
from clipcap_cache.logs import held_for_log_file, log_to_file
from clipcap_cache.model import (
    ClipCaptionModel,
    ModelConfig,
    build_model,
    count_parameters,
    load_tokenizer,
    pad_token_id,
)
from clipcap_cache.preemption import StopSignals
from clipcap_cache.retrieval import (
    Datastore,
    RetrievalSettings,
    Retriever,
    check_datastore,
)
from clipcap_cache.training import scst, trackers
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.data import MappedFiles, Prompts, caption_data
from clipcap_cache.training.loop import preempted, train_one_epoch
from clipcap_cache.training.objectives import CrossEntropy, Objective
from clipcap_cache.training.optimization import (
    Optimization,
    Schedule,
    make_optimization,
    plan_schedule,
)
from clipcap_cache.training.run_dir import (
    RunDirectory,
    check_init,
    check_run_dir,
    prepare_run_dir,
    save_training_checkpoint,
    write_metrics,
    write_run_config,
)
from clipcap_cache.training.state import TrainState, restore_rng
from clipcap_cache.training.validation import (
    make_scorer,
    validate,
    validation_set,
    validation_source,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    """A run's inputs, every one checked; nothing has been loaded or written yet."""

    model_config: ModelConfig  # completed from the run being resumed or the --init checkpoint
    train_cache: feature_cache.MappedCache
    train_rows: np.ndarray  # the cache rows of the training images
    val_cache: feature_cache.MappedCache | None  # None without validation
    val_rows: np.ndarray | None
    device: torch.device  # as resolved from --device; `distributed.setup` picks this rank's
    amp_dtype: torch.dtype | None  # autocast's dtype; None in fp32
    world: distributed.World
    resume_state: dict | None  # the `train_state.pt` to resume from; None for a new run
    init_dir: Path | None  # the --init checkpoint whose weights a new run starts from
    datastore: Datastore | None  # the --datastore of a retrieval-augmented run, indexed
    schedule: Schedule  # the learning-rate plan: new, or the resumed run's (or re-planned)


@dataclass(frozen=True)
class Models:
    """What a run loads: the caption model, its tokenizer and the reward's CLIP text tower."""

    model: ClipCaptionModel
    model_config: ModelConfig  # `model.config`: resolved by `build_model`, freeze_layers set
    tokenizer: object
    pad_id: int  # the token that pads caption batches
    clip_text: ClipText | None  # the cache's CLIP text tower, where the reward has a CLIP-S term
    retriever: Retriever | None  # the datastore and the prompt, with --retrieval


def train(config: TrainConfig, model_config: ModelConfig) -> dict:
    """Train a caption model; returns the last epoch's metrics row.

    The run directory is locked against other clipcap processes. Every input (caches, device,
    precision, the run directory, GPT-2 and its tokenizer) is checked before anything in it is
    replaced or written, so a failed start leaves an existing run as it was and nothing that
    blocks the corrected command.
    """
    run_dir = Path(config.out)
    refuse_file(run_dir, f"--out {run_dir} is a file; give a directory for the run")
    with locked(run_dir), StopSignals() as stop:
        with held_for_log_file():  # the lines logged before train.log exists go into it
            config, model_config, train_cache = resolve_settings(config, model_config)
            inputs = check_inputs(run_dir, config, model_config, train_cache)
            models = load_models(config, inputs)
            log_setup(config, inputs, models)
            objective = build_objective(config, train_cache, inputs.train_rows, models)
            validate_epoch = build_validation(config, inputs, models)
            optimization = run_optimization(models.model, objective, config, inputs)
            train_module = training_module(models.model, config, inputs.world)
            state = restore(run_dir, inputs.resume_state, models.model, optimization, config)
            run = run_directory(run_dir, models, train_cache, config, objective, inputs.val_cache)
            # Everything that can fail has been checked and loaded: only now is the directory
            # changed (an --overwrite deletes the old run here), by the main process alone.
            reporting = prepare_run(run_dir, config, models.model_config, inputs, state.history)
        try:
            with reporting:
                return fit(
                    models.model,
                    train_module,
                    objective,
                    optimization,
                    state,
                    config,
                    inputs.amp_dtype,
                    run,
                    validate_epoch,
                    stop,
                    reporting,
                )
        finally:
            run.mapped.close()


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (the main process takes it); leave the process group after."""
    main = distributed.is_main_process()
    try:
        with exclusive_lock(run_dir) if main else contextlib.nullcontext():
            if main:  # the lock's holder alone may finish a save that a crash interrupted
                checkpoint.recover_run(run_dir)
            yield
    finally:
        distributed.teardown()


def resolve_settings(
    config: TrainConfig, model_config: ModelConfig
) -> tuple[TrainConfig, ModelConfig, feature_cache.MappedCache]:
    """Resolved copies of the settings, and the training cache (opened for its embedding width).

    Local paths are recorded absolute, so the run resumes from any working directory, and hub
    names as `hub.resolve_name` gives them.
    """
    config = replace(
        config,
        features=str(Path(config.features).resolve()),
        val_features=config.val_features and str(Path(config.val_features).resolve()),
        init=config.init and resolve_name(config.init),
        bertscore_model=resolve_name(config.bertscore_model),
        datastore=config.datastore and str(Path(config.datastore).resolve()),
    )
    train_cache = feature_cache.open_cache(config.features)
    model_config = replace(
        model_config,
        clip_embedding_dim=train_cache.embedding_dim,
        gpt2_model=resolve_name(model_config.gpt2_model),
    )
    if feature_cache.is_text(train_cache.attrs) and not model_config.normalize_prefix:
        # Text and image embeddings meet only once both are unit vectors (CapDec): the model
        # records it, so that captioning normalises image embeddings the same way.
        log.info("training from text alone: the input embeddings are L2-normalised")
        model_config = replace(model_config, normalize_prefix=True)
    return config, model_config, train_cache


def check_inputs(
    run_dir: Path,
    config: TrainConfig,
    model_config: ModelConfig,
    train_cache: feature_cache.MappedCache,
) -> Inputs:
    """Check the caches, device, precision, process count, run directory and --init.

    Nothing is loaded or written; a bad input raises ClipcapError. A resume or --init completes
    the model config from the saved run's. The packages of the --report-to tools are imported
    here, on every rank, so a missing one stops every process before the run directory changes.
    """
    trackers.check_available(config.report_to)
    train_rows = train_cache.rows_of_split(TRAIN)
    if len(train_rows) == 0:
        raise ClipcapError(f"{config.features} has no train split to train on")
    val_cache, val_rows = validation_source(config, train_cache)
    device = resolve_device(config.device)
    amp_dtype = autocast_dtype(config.precision, device)
    world = distributed.world()
    if config.batch_size < world.size:
        raise ClipcapError(
            f"--batch-size {config.batch_size} is smaller than the {world.size} processes: it is "
            "the batch across all of them"
        )
    resume_state, model_config = check_run_dir(run_dir, config, model_config, train_cache)
    init_dir = None
    if config.init and resume_state is None:  # a resumed run continues from its own weights
        init_dir, model_config = check_init(config, model_config, train_cache)
    datastore = None
    if config.retrieval:
        datastore = Datastore.open(config.datastore)
        check_datastore(datastore, embedding_source(train_cache), f"the features {config.features}")
    progress = None
    if resume_state is not None:
        progress = TrainState.from_state_dict(resume_state)
        progress.batch = progress.samples_done // config.batch_size
    samples = epoch_samples(config, train_cache, train_rows)
    schedule = plan_schedule(config, samples, world.size, resume_state, progress)
    return Inputs(
        model_config=model_config,
        train_cache=train_cache,
        train_rows=train_rows,
        val_cache=val_cache,
        val_rows=val_rows,
        device=device,
        amp_dtype=amp_dtype,
        world=world,
        resume_state=resume_state,
        init_dir=init_dir,
        datastore=datastore,
        schedule=schedule,
    )


def epoch_samples(
    config: TrainConfig, train_cache: feature_cache.MappedCache, train_rows: np.ndarray
) -> int:
    """The samples of an epoch, as the objective will count them, before it is built.

    Cross-entropy trains on every caption of the training images; self-critical training on
    every training image with at least one caption (`_self_critical`).
    """
    captions = train_cache.captions_of_rows(train_rows)
    if config.objective != "scst":
        return len(captions)
    return len(np.unique(train_cache.caption_image_index[captions]))


def load_models(config: TrainConfig, inputs: Inputs) -> Models:
    """Seed torch, then load the tokenizer, build the model on this rank's device, load --init.

    The CLIP text tower of a CLIP-S reward is loaded here too, as it may fail, before the run
    directory is touched.
    """
    torch.manual_seed(config.seed)  # the projector's initial weights: the same on every rank
    tokenizer = load_tokenizer(inputs.model_config.gpt2_model)
    device = distributed.setup(inputs.device)
    model = build_model(inputs.model_config).to(device)
    check_positions(config, model)
    distributed.seed_rank_stream(config.seed)  # dropout masks of their own on every rank
    if inputs.init_dir is not None:
        saved = checkpoint.read_config(inputs.init_dir)
        checkpoint.check_base(model, saved, f"the --init checkpoint {inputs.init_dir}")
        checkpoint.load_weights(model, inputs.init_dir / checkpoint.WEIGHTS)
    if inputs.resume_state is not None:
        saved = checkpoint.read_config(Path(config.out) / "checkpoints" / "last")
        checkpoint.check_base(model, saved, "the run being resumed")
    reward_terms = scst.REWARD_TERMS[config.reward] if config.objective == "scst" else ()
    clip_text = None
    if "clip" in reward_terms:
        clip_model = cache_clip_model(inputs.train_cache.attrs, config.features, "--reward clip")
        clip_text = load_clip_text(clip_model, device)
        check_loaded_clip(inputs.train_cache.attrs, config.features, clip_text)
    retriever = None
    if inputs.datastore is not None:
        retriever = Retriever(inputs.datastore, retrieval_settings(config), tokenizer)
    return Models(model, model.config, tokenizer, pad_token_id(tokenizer), clip_text, retriever)


def retrieval_settings(config: TrainConfig) -> RetrievalSettings | None:
    """What a retrieval-augmented run records in its checkpoints; None without retrieval."""
    if not config.retrieval:
        return None
    return RetrievalSettings(
        k=config.retrieval,
        template=config.retrieval_template,
        separator=config.retrieval_separator,
        datastore=config.datastore,
    )


def embedding_source(cache: feature_cache.MappedCache) -> dict:
    """The CLIP model, fingerprint and width of a cache's embeddings (`check_clip_match`)."""
    return feature_cache.clip_source(cache.attrs, cache.embedding_dim)


def check_positions(config: TrainConfig, model: ClipCaptionModel) -> None:
    """Refuse a --max-caption-tokens whose sequences do not fit GPT-2's position embeddings.

    A training sequence is the prefix, the caption's tokens and EOS (under scst the prefix and
    the sampled tokens, EOS included).
    """
    positions = model.gpt2.config.n_positions
    longest = model.config.prefix_length + config.max_caption_tokens + 1
    if longest > positions:
        raise ClipcapError(
            f"--max-caption-tokens {config.max_caption_tokens}: with the prefix of "
            f"{model.config.prefix_length} and EOS a caption takes {longest} positions, and "
            f"{model.config.gpt2_model} has {positions}; pass --max-caption-tokens "
            f"{positions - model.config.prefix_length - 1} or less"
        )


def prepare_run(
    run_dir: Path,
    config: TrainConfig,
    model_config: ModelConfig,
    inputs: Inputs,
    history: list[dict],
) -> trackers.Trackers:
    """Create (or with --overwrite, clear) the run directory, open the trackers, start logging.

    The first write of a run, and config.json. Returns the trackers (`--report-to`), to be closed
    after the run (a context manager). Only the main process writes, reports and logs to
    `train.log`; the others log warnings only. A resumed run's `metrics.jsonl` is rewritten from
    its `history`. The trackers are opened before `train.log` and `config.json` are written: a
    tool that cannot start (W&B without a login, say) leaves no run behind that would refuse the
    next command.
    """
    reporting = trackers.Trackers()
    if inputs.world.is_main:
        prepare_run_dir(run_dir, config)
        resume_step = None if inputs.resume_state is None else int(inputs.resume_state["step"])
        params = trackers.hyperparameters(config, model_config)
        reporting = trackers.open_trackers(config.report_to, run_dir, params, resume_step)
        try:
            log_to_file(run_dir / "train.log")
            write_run_config(run_dir, config, model_config)
            if config.resume:
                write_metrics(run_dir, history)
        except BaseException:
            reporting.close("failed")
            raise
    log.info("run directory %s", run_dir)
    for tracker in reporting.trackers:
        log.info("reporting to %s%s", tracker.name, tracker.where())
    return reporting


def log_setup(config: TrainConfig, inputs: Inputs, models: Models) -> None:
    """Log where the weights start from, the batch and the parameter counts."""
    if inputs.init_dir is not None:
        log.info("initialised from %s", inputs.init_dir)
    elif config.objective == "scst" and inputs.resume_state is None:
        log.warning(
            "--objective scst from untrained weights: self-critical training refines a trained "
            "captioner; start from a cross-entropy run with --init RUN"
        )
    log.info(
        "batch: %d %ss per micro-batch across %d process(es), %d micro-batch(es) per step",
        config.batch_size,
        "image" if config.objective == "scst" else "caption",
        inputs.world.size,
        config.grad_accum,
    )
    trainable, frozen = count_parameters(models.model)
    log.info(
        "parameters: %s trainable, %s frozen (GPT-2 blocks frozen: %d of %d)",
        f"{trainable:,}",
        f"{frozen:,}",
        models.model_config.freeze_layers,
        models.model.gpt2.config.n_layer,
    )


def build_objective(
    config: TrainConfig,
    train_cache: feature_cache.MappedCache,
    train_rows: np.ndarray,
    models: Models,
) -> Objective:
    """The objective `--objective` names, over the training images of the cache."""
    if config.objective == "scst":
        return _self_critical(config, train_cache, train_rows, models.tokenizer, models.clip_text)
    data, truncated = caption_data(
        train_cache, train_rows, models.tokenizer, config.max_caption_tokens, models.retriever
    )
    log.info(
        "train: %d %s, %d captions; %d of the cache's captions truncated to %d tokens",
        len(train_rows),
        "caption rows (text alone)" if feature_cache.is_text(train_cache.attrs) else "images",
        len(data),
        truncated,
        config.max_caption_tokens,
    )
    if data.prompts is not None:
        check_prompt_length(data.prompts, models, config)
        log.info(
            "retrieval: %d captions per prompt from %s, each image's own skipped; longest "
            "prompt %d tokens",
            config.retrieval,
            config.datastore,
            data.prompts.longest,
        )
    if config.noise_variance:
        log.info(
            "noise: Gaussian of variance %g added to each input embedding", config.noise_variance
        )
    return CrossEntropy(data, models.pad_id, math.sqrt(config.noise_variance))


def check_prompt_length(prompts: Prompts, models: Models, config: TrainConfig) -> None:
    """Refuse prompts that leave GPT-2 no room for the prefix and a whole caption."""
    room = models.model.gpt2.config.n_positions
    needed = models.model_config.prefix_length + prompts.longest + config.max_caption_tokens + 1
    if needed > room:
        raise ClipcapError(
            f"the longest retrieval prompt is {prompts.longest} tokens: with the prefix "
            f"({models.model_config.prefix_length}) and a caption of up to "
            f"{config.max_caption_tokens + 1} tokens that is {needed} positions, more than this "
            f"GPT-2's {room}; lower --retrieval or --max-caption-tokens"
        )


def build_validation(
    config: TrainConfig, inputs: Inputs, models: Models
) -> Callable[[], dict] | None:
    """What scores the model after each epoch (`validation.validate`); None without validation."""
    if inputs.val_cache is None:
        return None
    validation = validation_set(
        inputs.val_cache, inputs.val_rows, models.tokenizer, config, models.retriever
    )
    log.info("val: %d images, %d captions", len(inputs.val_rows), len(validation.data))
    return functools.partial(
        validate,
        models.model,
        models.tokenizer,
        validation,
        make_scorer(config, next(models.model.parameters()).device),
        inputs.amp_dtype,
        config.batch_size,
        models.pad_id,
    )


def run_optimization(
    model: ClipCaptionModel, objective: Objective, config: TrainConfig, inputs: Inputs
) -> Optimization:
    """AdamW and the run's schedule (`Inputs.schedule`), planned for the objective's samples."""
    if len(objective) != inputs.schedule.samples:  # `epoch_samples` must count as it does
        raise AssertionError(f"{len(objective)} samples, planned for {inputs.schedule.samples}")
    device = next(model.parameters()).device
    return make_optimization(model, config, device, inputs.schedule, inputs.amp_dtype)


def training_module(model: ClipCaptionModel, config: TrainConfig, world: distributed.World):
    """The model as training calls it: the model itself, or its DDP or compiled form.

    Under torchrun it is wrapped in DistributedDataParallel; with --compile, compiled.
    """
    train_module = model
    device = next(model.parameters()).device
    if world.size > 1:
        train_module = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if config.compile:
        train_module = torch.compile(train_module, dynamic=True)
    return train_module


def restore(
    run_dir: Path,
    resume_state: dict | None,
    model: ClipCaptionModel,
    optimization: Optimization,
    config: TrainConfig,
) -> TrainState:
    """Where the run starts: a new state, or a resumed run's, its weights and optimizer loaded.

    A resume restores every rank's random number generators too, so the run goes on as if it
    had never stopped.
    """
    state = TrainState()
    if resume_state is None:
        return state
    world, device = distributed.world(), next(model.parameters()).device
    checkpoint.load_weights(model, run_dir / "checkpoints" / "last" / checkpoint.WEIGHTS)
    optimization.load_state_dict(resume_state)
    restore_rng(resume_state, device, world)
    state.load_state_dict(resume_state)
    # The position is kept in samples, so a resume with another --batch-size (checked to divide
    # it) starts at the same sample.
    state.batch = state.samples_done // config.batch_size
    log.info("resumed at epoch %d, batch %d, step %d", state.epoch + 1, state.batch, state.step)
    return state


def run_directory(
    run_dir: Path,
    models: Models,
    train_cache: feature_cache.MappedCache,
    config: TrainConfig,
    objective: Objective,
    val_cache: feature_cache.MappedCache | None,
) -> RunDirectory:
    """The run's folder, what every checkpoint of it records, and the mapped files it watches."""
    arrays = [train_cache.embeddings, train_cache.caption_image_index]
    if isinstance(objective, CrossEntropy):
        arrays += [objective.data.token_ids, objective.data.offsets]
    if val_cache is not None:
        arrays += [val_cache.embeddings, val_cache.caption_image_index]
    return RunDirectory(
        run_dir,
        models.tokenizer,
        {
            "gpt2_fingerprint": models.model.base_fingerprint,
            "clip_model": feature_cache.recorded_clip_model(train_cache.attrs),
            # None for a cache made before fingerprints: its checkpoints are then not checked.
            "clip_fingerprint": feature_cache.recorded_clip_fingerprint(train_cache.attrs),
            "cache_source": train_cache.attrs.get("source"),
            "embedding_dim": train_cache.embedding_dim,
            "trained_on": "text" if feature_cache.is_text(train_cache.attrs) else "images",
            "retrieval": asdict(settings) if (settings := retrieval_settings(config)) else None,
            "train": asdict(config),
        },
        MappedFiles.of(*arrays),
    )


def fit(
    model: ClipCaptionModel,
    train_module,
    objective: Objective,
    optimization: Optimization,
    state: TrainState,
    config: TrainConfig,
    amp_dtype: torch.dtype | None,
    run: RunDirectory,
    validate_epoch: Callable[[], dict] | None,
    stop: StopSignals,
    reporting: trackers.Trackers | None = None,
) -> dict:
    """Train the epochs left; after each, validate, log, and save the best and last checkpoints.

    Returns the last epoch's metrics row (the last recorded one when no epoch was left). A signal
    (`stop`) ends the run with `Preempted` once its position is saved: mid-epoch at a step, or
    after the epoch's checkpoints. Each epoch's row goes to `reporting` too, as `epoch/NAME`.
    """
    reporting = reporting or trackers.Trackers()
    world = distributed.world()
    criterion, higher_is_better = selection(config)
    log.info(
        "best checkpoint: the epoch with the %s %s",
        "highest" if higher_is_better else "lowest",
        criterion,
    )
    row = state.history[-1] if state.history else {}
    for _ in range(state.epoch, config.epochs):
        row = train_one_epoch(
            model,
            train_module,
            objective,
            optimization,
            state,
            config,
            amp_dtype,
            run,
            stop,
            reporting,
        )
        if validate_epoch is not None:
            # The main process validates, exactly as one process would; the others wait.
            if world.is_main:
                row.update(validate_epoch())
            row = distributed.broadcast_object(row)
        state.finish_epoch(row)
        log.info("epoch %d: %s", state.epoch, format_row(row))
        # Reported before the epoch's resume point is saved: a run killed in between replays
        # the epoch's end, and its trackers show it once (`trackers.py`).
        reporting.log_metrics(
            {f"epoch/{key}": value for key, value in row.items() if key != "step"}, row["step"]
        )
        reporting.flush()
        score = row[criterion]
        if state.best is None or (score > state.best if higher_is_better else score < state.best):
            state.best = score
            save_training_checkpoint(run, "best", model, state, metrics=row)
        save_training_checkpoint(run, "last", model, state, optimization, metrics=row)
        if world.is_main:
            write_metrics(run.path, state.history)
        signum = stop.agreed(next(model.parameters()).device, world)
        if signum and state.epoch < config.epochs:
            raise preempted(signum, state, run)
    log.info("done: best checkpoint %s", run.path / "checkpoints" / "best")
    return row


def format_row(row: dict) -> str:
    """A metrics row as the log shows it: `key=value`, floats to 4 significant digits."""
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in row.items()
        if k != "epoch"
    )


def selection(config: TrainConfig) -> tuple[str, bool]:
    """The metrics row key that picks `checkpoints/best`, and whether higher is better.

    Cross-entropy runs keep the lowest val loss (train loss without validation); self-critical
    runs keep the highest val CIDEr-D of greedy captions (mean sample reward without validation).
    """
    if config.objective == "scst":
        return ("val_cider", True) if config.validate else ("reward", True)
    return ("val_loss", False) if config.validate else ("train_loss", False)


def _self_critical(
    config: TrainConfig,
    cache: feature_cache.MappedCache,
    rows: np.ndarray,
    tokenizer,
    clip_text: ClipText | None,
) -> scst.SelfCritical:
    """The self-critical objective over the captioned training images, with its reward.

    `clip_text` is the cache's CLIP text tower where the reward has a CLIP-S term.
    """
    references = cache.references(rows)
    captioned = np.array([len(r) > 0 for r in references], dtype=bool)
    rows = rows[captioned]
    references = [r for r in references if r]
    if len(rows) == 0:
        raise ClipcapError(f"{config.features}: no train image has a caption to reward against")
    cider = None
    if "cider" in scst.REWARD_TERMS[config.reward]:
        started = time.perf_counter()
        cider = CiderD(references)
        log.info(
            "CIDEr-D document frequencies of %d train images' references in %.1f s",
            len(references),
            time.perf_counter() - started,
        )
    log.info(
        "scst: %d train images, %d samples each, reward %s, baseline %s",
        len(rows),
        config.samples,
        config.reward,
        config.baseline,
    )
    return scst.SelfCritical(
        embeddings=cache.embeddings,
        rows=rows,
        references=references,
        reward=scst.Reward(
            config.reward, cider, clip_text, config.cider_weight, config.clip_weight
        ),
        tokenizer=tokenizer,
        samples=config.samples,
        baseline=config.baseline,
        max_tokens=config.max_caption_tokens,
        seed=config.seed,
    )
