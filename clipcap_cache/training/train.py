"""Stage 2: train the projector and the unfrozen GPT-2 blocks from a feature cache.

    clipcap train data/coco_vitb32.h5 --out runs/coco
    torchrun --nproc-per-node 8 --no-python clipcap train data/coco_vitb32.h5 --out runs/coco

CLIP is never loaded. The cached embeddings are memory-mapped, and every caption is tokenized
once into a file beside the cache that is memory-mapped too (`tokens.py`), so the processes of a
node share one copy of the data and a cache may be bigger than RAM. Each caption of an image is a
sample; samples are shuffled every epoch and each batch is padded only to its longest caption.

The loop is a few named parts. `train` sets a run up and runs its epochs. `train_one_epoch` makes
one pass over the shuffled samples of the objective, one micro-batch at a time through the
objective's `forward_backward`, and `Optimization.step` (one optimizer step). The objective is
`CrossEntropy` (`--objective xe`, the default: a sample is a caption) or `scst.SelfCritical`
(`--objective scst`: a sample is an image, whose sampled captions are rewarded with CIDEr-D).
`validate` scores the model on the val images, and `save_training_checkpoint` writes a
checkpoint. How far a run has got lives in a `TrainState`.

Under torchrun the model is wrapped in DistributedDataParallel and `batch_size` is the global
batch: every rank takes every N-th sample of the same shuffled batch (see `distributed.py`).

The run directory holds `config.json` (the resolved settings), `train.log`, `metrics.jsonl` (one row
per epoch), `plots/*.png` and `checkpoints/{best,last}/` (see `checkpoint.py`). The last checkpoint
also carries `train_state.pt`, written at every epoch end and every `save_every_steps` optimizer
steps, so `--resume` continues a killed run; on the CPU with the same seed it reaches the same
weights as a run that was never interrupted.
"""

import contextlib
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from clipcap_cache import checkpoint, distributed
from clipcap_cache.data import cache as feature_cache
from clipcap_cache.devices import autocast_dtype, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.evaluation.cider import CiderD
from clipcap_cache.evaluation.clipscore import ClipText, cache_clip_model, load_clip_text
from clipcap_cache.files import exclusive_lock
from clipcap_cache.hub import resolve_name
from clipcap_cache.logs import log_to_file
from clipcap_cache.model import ModelConfig, build_model, count_parameters, load_tokenizer
from clipcap_cache.training import scst
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.data import caption_data
from clipcap_cache.training.loop import train_one_epoch
from clipcap_cache.training.objectives import CrossEntropy
from clipcap_cache.training.optimization import make_optimization
from clipcap_cache.training.run_dir import (
    RunDirectory,
    check_init,
    check_run_dir,
    prepare_run_dir,
    save_training_checkpoint,
    write_metrics,
    write_run_config,
)
from clipcap_cache.training.state import TrainState
from clipcap_cache.training.validation import (
    make_scorer,
    validate,
    validation_set,
    validation_source,
)

log = logging.getLogger(__name__)


def train(config: TrainConfig, model_config: ModelConfig) -> dict:
    """Train a caption model; returns the last epoch's metrics row.

    The run directory is locked against other clipcap processes. Every input (caches, device,
    precision, the run directory, GPT-2 and its tokenizer) is checked before anything in it is
    replaced or written, so a failed start leaves an existing run as it was and nothing that
    blocks the corrected command.
    """
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ClipcapError(f"--out {run_dir} is a file; give a directory for the run")
    main = distributed.is_main_process()
    try:
        with exclusive_lock(run_dir) if main else contextlib.nullcontext():
            return _train(run_dir, config, model_config)
    finally:
        distributed.teardown()


def _train(run_dir: Path, config: TrainConfig, model_config: ModelConfig) -> dict:
    # Local paths are recorded absolute, so the run resumes from any working directory.
    config = replace(
        config,
        features=str(Path(config.features).resolve()),
        val_features=config.val_features and str(Path(config.val_features).resolve()),
        init=config.init and resolve_name(config.init),
        bertscore_model=resolve_name(config.bertscore_model),
    )
    train_cache = feature_cache.open_cache(config.features)
    model_config = replace(
        model_config,
        clip_embedding_dim=train_cache.embedding_dim,
        gpt2_model=resolve_name(model_config.gpt2_model),
    )
    train_rows = train_cache.rows_of_split("train")
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
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(model_config.gpt2_model)
    device = distributed.setup(device)
    model = build_model(model_config).to(device)
    if init_dir is not None:
        checkpoint.load_weights(model, init_dir / checkpoint.WEIGHTS)
    reward_terms = scst.REWARD_TERMS[config.reward] if config.objective == "scst" else ()
    clip_text = None
    if "clip" in reward_terms:  # loaded here, as it may fail, before the directory is touched
        clip_model = cache_clip_model(train_cache.attrs, config.features, "--reward clip")
        clip_text = load_clip_text(clip_model, device)

    # Everything is checked: only now is the directory changed, by the main process alone.
    if world.is_main:
        prepare_run_dir(run_dir, config)
        log_to_file(run_dir / "train.log")
        write_run_config(run_dir, config, model.config)
    log.info("run directory %s", run_dir)
    if init_dir is not None:
        log.info("initialised from %s", init_dir)
    elif config.objective == "scst" and resume_state is None:
        log.warning(
            "--objective scst from untrained weights: self-critical training refines a trained "
            "captioner; start from a cross-entropy run with --init RUN"
        )
    log.info(
        "batch: %d %ss per micro-batch across %d process(es), %d micro-batch(es) per step",
        config.batch_size,
        "image" if config.objective == "scst" else "caption",
        world.size,
        config.grad_accum,
    )
    trainable, frozen = count_parameters(model)
    log.info(
        "parameters: %s trainable, %s frozen (GPT-2 blocks frozen: %d of %d)",
        f"{trainable:,}",
        f"{frozen:,}",
        model.config.freeze_layers,
        model.gpt2.config.n_layer,
    )

    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if config.objective == "scst":
        objective = _self_critical(config, train_cache, train_rows, tokenizer, clip_text)
    else:
        data, truncated = caption_data(
            train_cache, train_rows, tokenizer, config.max_caption_tokens
        )
        log.info(
            "train: %d images, %d captions; %d of the cache's captions truncated to %d tokens",
            len(train_rows),
            len(data),
            truncated,
            config.max_caption_tokens,
        )
        objective = CrossEntropy(data, pad_id)
    validation = None
    if val_cache is not None:
        validation = validation_set(val_cache, val_rows, tokenizer, config)
        log.info("val: %d images, %d captions", len(val_rows), len(validation.data))
    scorer = make_scorer(config, device) if validation is not None else None

    batches_per_epoch = math.ceil(len(objective) / config.batch_size)
    total_steps = math.ceil(batches_per_epoch / config.grad_accum) * config.epochs
    optimization = make_optimization(model, config, device, total_steps, amp_dtype)
    forward = model
    if world.size > 1:
        forward = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if config.compile:
        forward = torch.compile(forward, dynamic=True)

    state = TrainState()
    if resume_state is not None:
        checkpoint.load_weights(model, run_dir / "checkpoints" / "last" / checkpoint.WEIGHTS)
        optimization.load_state_dict(resume_state)
        if world.size > 1:
            torch.set_rng_state(resume_state["torch_rng_per_rank"][world.rank])
            if device.type == "cuda" and resume_state.get("cuda_rng_per_rank"):
                torch.cuda.set_rng_state(resume_state["cuda_rng_per_rank"][world.rank], device)
        else:
            torch.set_rng_state(resume_state["torch_rng"])
            if device.type == "cuda" and resume_state.get("cuda_rng"):
                torch.cuda.set_rng_state_all(resume_state["cuda_rng"])
        state.load_state_dict(resume_state)
        # The position is kept in samples, so a resume with another --batch-size (checked to
        # divide it) starts at the same caption.
        state.batch = state.captions // config.batch_size
        log.info("resumed at epoch %d, batch %d, step %d", state.epoch + 1, state.batch, state.step)
        if world.is_main:
            write_metrics(run_dir, state.history)

    run = RunDirectory(
        run_dir,
        tokenizer,
        {
            "clip_model": train_cache.attrs.get("clip_model"),
            "cache_source": train_cache.attrs.get("source"),
            "embedding_dim": train_cache.embedding_dim,
            "train": asdict(config),
        },
    )
    criterion, higher_is_better = selection(config)
    log.info(
        "best checkpoint: the epoch with the %s %s",
        "highest" if higher_is_better else "lowest",
        criterion,
    )
    row = state.history[-1] if state.history else {}
    for _ in range(state.epoch, config.epochs):
        row = train_one_epoch(
            model, forward, objective, optimization, state, config, amp_dtype, run
        )
        if validation is not None:
            # The main process validates, exactly as one process would; the others wait.
            if world.is_main:
                row.update(
                    validate(
                        model, tokenizer, validation, scorer, amp_dtype, config.batch_size, pad_id
                    )
                )
            row = distributed.broadcast_object(row)
        state.finish_epoch(row)
        log.info(
            "epoch %d: %s",
            state.epoch,
            ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
                if k != "epoch"
            ),
        )
        score = row[criterion]
        if state.best is None or (score > state.best if higher_is_better else score < state.best):
            state.best = score
            save_training_checkpoint(run, "best", model, state, metrics=row)
        save_training_checkpoint(run, "last", model, state, optimization, metrics=row)
        if world.is_main:
            write_metrics(run_dir, state.history)
    log.info("done: best checkpoint %s", run_dir / "checkpoints" / "best")
    return row


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
