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
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from clipcap_cache import cache as feature_cache
from clipcap_cache import checkpoint, distributed, scst, tokens
from clipcap_cache.cider import CiderD
from clipcap_cache.clipscore import ClipText, cache_clip_model, load_clip_text
from clipcap_cache.devices import DEVICES, PRECISIONS, autocast_dtype, resolve_device
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import exclusive_lock, write_json_atomic
from clipcap_cache.generate import DecodeConfig, generate_captions
from clipcap_cache.hub import resolve_name
from clipcap_cache.logs import setup_logging, write_jsonl
from clipcap_cache.metrics import bertscore, make_bertscorer
from clipcap_cache.model import (
    IGNORE_INDEX,
    ClipCaptionModel,
    ModelConfig,
    build_model,
    count_parameters,
    load_tokenizer,
)
from clipcap_cache.plots import plot_metrics
from clipcap_cache.validation import at_least, check_types, one_of, option, positive

log = logging.getLogger(__name__)
OBJECTIVES = ("xe", "scst")
RUN_ARTEFACTS = ("checkpoints", "config.json", "train.log", "metrics.jsonl", "plots")
SYNC_SECONDS = 0.5  # how often the host reads the loss back from the device (progress, NaN check)
SYNC_STEPS = 20  # the same, in optimizer steps, under torchrun (where every rank must take part)


@dataclass
class TrainConfig:
    """Training settings; saved with the model config as the run's `config.json`."""

    features: str  # the HDF5 feature cache to train on
    out: str  # the run directory
    val_features: str | None = None  # validate on every image of this cache instead of `val`
    validate: bool = True  # run validation each epoch
    epochs: int = 10
    batch_size: int = 40
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5
    warmup_steps: int = 5000  # linear warmup, then linear decay to zero
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_caption_tokens: int = 40  # longer captions are truncated (EOS still appended)
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 42
    eval_images: int = 500  # val images captioned each epoch for CIDEr-D and BERTScore
    bertscore: bool = True
    bertscore_model: str = "roberta-large"
    bertscore_layers: int | None = None  # needed for models bert-score does not know
    save_every_steps: int = 1000  # optimizer steps between mid-epoch resume points; 0 = epoch ends
    compile: bool = False  # torch.compile the model
    init: str | None = None  # start a new run from this checkpoint's weights (ignored on resume)
    objective: str = "xe"  # xe (cross-entropy) | scst (self-critical, see scst.py)
    samples: int = 5  # scst: captions sampled per image
    baseline: str = "mean"  # scst: mean (of the image's other samples) | greedy
    reward: str = "cider"  # scst: cider | clip | cider+clip
    cider_weight: float = 1.0  # scst: weight of CIDEr-D in cider+clip
    clip_weight: float = 1.0  # scst: weight of CLIP-S in cider+clip
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        check_types(self)
        at_least(self, 1, "epochs", "batch_size", "grad_accum", "max_caption_tokens")
        at_least(self, 1, "bertscore_layers", "samples")
        at_least(self, 0, "warmup_steps", "eval_images", "save_every_steps", "weight_decay")
        at_least(self, 0, "cider_weight", "clip_weight")
        positive(self, "lr", "max_grad_norm")
        one_of(self, "device", DEVICES)
        one_of(self, "precision", PRECISIONS)
        one_of(self, "objective", OBJECTIVES)
        one_of(self, "baseline", scst.BASELINES)
        one_of(self, "reward", scst.REWARDS)
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
        if self.resume and self.overwrite:
            raise ClipcapError("--resume and --overwrite contradict each other: choose one")


@dataclass
class CaptionData:
    """Some captions of a cache, tokenized, and the embeddings of their images.

    The arrays span the whole cache and are memory-mapped in training (`cache.open_cache`,
    `tokens.load_token_table`); `captions` picks the ones this set uses. A sample is a position
    in `captions`.
    """

    embeddings: np.ndarray  # (N, D) every row of the cache, as stored (float16 by default)
    token_ids: np.ndarray  # (T,) every caption's tokens, EOS included, concatenated
    offsets: np.ndarray  # (M+1,) caption m is token_ids[offsets[m]:offsets[m+1]]
    caption_rows: np.ndarray  # (M,) embedding row of each caption
    captions: np.ndarray  # (C,) the captions of this set, as indices into the M

    def __len__(self) -> int:
        return len(self.captions)

    def count_tokens(self, samples: np.ndarray) -> int:
        """Labelled tokens (caption tokens plus EOS) of some samples."""
        m = self.captions[samples]
        return int((self.offsets[m + 1] - self.offsets[m]).sum())

    def batch(self, samples: np.ndarray, pad_id: int):
        """Embeddings (B, D) and right-padded input_ids, labels (B, T) of some samples."""
        m = self.captions[samples]
        lengths = self.offsets[m + 1] - self.offsets[m]
        input_ids = np.full((len(m), int(lengths.max())), pad_id, dtype=np.int64)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        for j, (start, n) in enumerate(zip(self.offsets[m], lengths, strict=True)):
            tokens = self.token_ids[start : start + n]
            input_ids[j, :n] = tokens
            labels[j, :n] = tokens
        embeddings = torch.from_numpy(np.asarray(self.embeddings[self.caption_rows[m]]))
        return embeddings.float(), torch.from_numpy(input_ids), torch.from_numpy(labels)


def caption_data(
    cache: feature_cache.MappedCache, rows: np.ndarray, tokenizer, max_tokens: int
) -> tuple[CaptionData, int]:
    """The captions of some rows of a cache, and how many of the cache's captions were cut."""
    table = tokens.load_token_table(cache, tokenizer, max_tokens)
    data = CaptionData(
        embeddings=cache.embeddings,
        token_ids=table.token_ids,
        offsets=table.offsets,
        caption_rows=cache.caption_image_index,
        captions=cache.captions_of_rows(rows),
    )
    return data, table.truncated


@dataclass
class ValidationSet:
    """What validation runs on: every val caption, and the val images captioned for BERTScore."""

    data: CaptionData  # every caption of the validation images
    embeddings: torch.Tensor  # (E, D) the images captioned for CIDEr-D and BERTScore
    references: list[list[str]]
    cider: CiderD | None  # their references' document frequencies (None with --eval-images 0)


@dataclass
class TrainState:
    """How far a run has got; saved in `train_state.pt`, so `--resume` continues where it stopped."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps so far
    loss_sum: float = 0.0  # the current epoch's summed loss, as read back from the device
    tokens: int = 0  # what the loss is averaged over: labelled tokens (xe) or images (scst)
    captions: int = 0  # the current epoch's samples done (captions, or images under scst)
    seconds: float = 0.0  # the current epoch's training time up to the last save
    best: float | None = None  # the best value of the selection criterion (`selection`) so far
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    sums: dict[str, float] = field(default_factory=dict)  # scst: summed rewards and lengths

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # A field that a run saved by an older version lacks keeps its default.
        for field_ in fields(self):
            if field_.name in state:
                setattr(self, field_.name, state[field_.name])

    def finish_epoch(self, row: dict) -> None:
        """Record a completed epoch's metrics and reset the per-epoch counters."""
        self.epoch += 1
        self.batch, self.loss_sum, self.tokens, self.captions, self.seconds = 0, 0.0, 0, 0, 0.0
        self.sums = {}
        self.history = [*self.history, row]


@dataclass
class CrossEntropy:
    """`--objective xe`, teacher-forced captions: a sample is a caption, weighted by its tokens."""

    data: CaptionData
    pad_id: int
    unit = "caption"
    metrics = ("loss",)

    def __len__(self) -> int:
        return len(self.data)

    def count(self, samples: np.ndarray) -> int:
        return self.data.count_tokens(samples)

    def forward_backward(
        self,
        model: ClipCaptionModel,
        forward,
        samples: np.ndarray,
        weight: float,
        scaler: torch.amp.GradScaler,
        amp_dtype: torch.dtype | None,
        epoch: int,
    ) -> torch.Tensor:
        """Back-propagate some captions; returns their mean loss per token (1,), on the device."""
        device = next(model.parameters()).device
        embeddings, input_ids, labels = self.data.batch(samples, self.pad_id)
        loss = forward_backward(
            forward,
            embeddings.to(device),
            input_ids.to(device),
            labels.to(device),
            weight,
            scaler,
            amp_dtype,
        )
        return loss.reshape(1)


@dataclass
class Optimization:
    """What an optimizer step needs: AdamW, its learning-rate schedule and the AMP grad scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    max_grad_norm: float

    def step(self) -> None:
        """Clip the (unscaled) gradients, update, clear the gradients and advance the schedule."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def make_optimization(
    model: ClipCaptionModel,
    config: TrainConfig,
    device: torch.device,
    total_steps: int,
    amp_dtype: torch.dtype | None = None,
) -> Optimization:
    """AdamW over the trainable parameters, warmup then linear decay, and a grad scaler for fp16.

    AdamW is fused into a few kernels per step where torch has that (CPU, CUDA, MPS).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=device.type in ("cpu", "cuda", "mps"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_then_decay(config.warmup_steps, total_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Optimization(optimizer, scheduler, scaler, params, config.max_grad_norm)


@dataclass(frozen=True)
class RunDirectory:
    """A run's folder, and what each of its checkpoints records beside the weights."""

    path: Path
    tokenizer: object  # saved into every checkpoint, so captioning needs nothing else
    info: dict  # clip_model, cache_source, embedding_dim and the training settings


def save_training_checkpoint(
    run: RunDirectory,
    name: str,
    model: ClipCaptionModel,
    state: TrainState,
    optimization: Optimization | None = None,
    metrics: dict | None = None,
) -> None:
    """Write `checkpoints/NAME`; with `optimization`, also everything `--resume` needs.

    Every rank calls this (each one's RNG state is gathered); only the main process writes.
    """
    train_state = None
    if optimization is not None:
        device = next(model.parameters()).device
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        rng_per_rank = distributed.all_gather_objects((torch.get_rng_state(), cuda_rng))
        train_state = {
            **state.state_dict(),
            **optimization.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "world_size": len(rng_per_rank),
            "torch_rng_per_rank": [cpu for cpu, _ in rng_per_rank],
            "cuda_rng_per_rank": [gpu for _, gpu in rng_per_rank if gpu is not None],
        }
    if not distributed.is_main_process():
        return
    try:
        checkpoint.save_checkpoint(
            run.path / "checkpoints" / name,
            model,
            run.tokenizer,
            {**run.info, "epoch": state.epoch, "step": state.step, "metrics": metrics},
            train_state,
        )
    except OSError as e:
        raise ClipcapError(
            f"cannot write checkpoint {run.path / 'checkpoints' / name}: {e.strerror or e}; "
            "the last complete checkpoint is kept. Free space or fix permissions, then --resume"
        ) from None


def forward_backward(
    forward,
    embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """One micro-batch: the loss under autocast, and its gradient scaled by `weight`.

    Returns the detached mean loss per token, still on the device.
    """
    device = embeddings.device
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = forward(embeddings, input_ids, labels)
    scaler.scale(loss * weight).backward()
    return loss.detach().float()


def train_one_epoch(
    model: ClipCaptionModel,
    forward,
    objective,
    optimization: Optimization,
    state: TrainState,
    config: TrainConfig,
    amp_dtype: torch.dtype | None,
    run: RunDirectory,
) -> dict:
    """One pass over the shuffled samples, from `state.batch` on; returns the epoch's row.

    `objective` is `CrossEntropy` (a sample is a caption) or `scst.SelfCritical` (a sample is an
    image). `forward` is the model, or its DDP or compiled form. Every `config.save_every_steps`
    optimizer steps the run saves a resume point in `checkpoints/last`.
    """
    model.train()
    device = next(model.parameters()).device
    world = distributed.world()
    epoch = state.epoch
    batches_per_epoch = math.ceil(len(objective) / config.batch_size)
    order = torch.randperm(
        len(objective), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)
    ).numpy()
    bar = tqdm(
        total=batches_per_epoch,
        initial=state.batch,
        unit="batch",
        desc=f"epoch {epoch + 1}/{config.epochs}",
        dynamic_ncols=True,
        leave=False,
        disable=not world.is_main,
    )
    started = time.perf_counter() - state.seconds
    # The summed loss stays on the device between syncs, so the host does not wait for the GPU
    # at every step. Steps of a full-size model on the CPU take longer than SYNC_SECONDS, so
    # there every step syncs.
    pending = torch.zeros(len(objective.metrics), device=device)  # summed over the samples
    first_batch = state.batch
    synced_batch, synced_at = first_batch, time.perf_counter()
    try:
        for b in range(first_batch, batches_per_epoch):
            group_start = b - b % config.grad_accum
            group_end = min(group_start + config.grad_accum, batches_per_epoch)
            if b in (group_start, first_batch):
                # A resume with another --grad-accum may start mid-group: its group starts there.
                start = max(group_start, first_batch)
                group = order[start * config.batch_size : group_end * config.batch_size]
                group_tokens = objective.count(group)
            # The batch is global: each rank takes every world.size-th sample of it (under scst,
            # whole images, each with all of its sampled captions).
            samples = order[b * config.batch_size : (b + 1) * config.batch_size]
            tokens = objective.count(samples)
            mine = samples[world.rank :: world.size]
            my_tokens = objective.count(mine)
            if len(mine) == 0:
                # A short last batch may leave a rank nothing; it still joins the gradient
                # all-reduce, with a sample weighted zero.
                mine = samples[:1]
            # Weighting each micro-batch by its share of the group's tokens (images under scst)
            # makes the accumulated gradient that of the mean loss over the whole group, as one
            # large batch would give. DDP averages over ranks, so each rank's share is scaled by
            # their number.
            weight = my_tokens / group_tokens * world.size
            sync_gradients = b + 1 == group_end or world.size == 1
            with contextlib.nullcontext() if sync_gradients else forward.no_sync():
                means = objective.forward_backward(
                    model, forward, mine, weight, optimization.scaler, amp_dtype, epoch
                )
            pending += means * my_tokens
            state.tokens += tokens
            state.captions += len(samples)
            bar.update(1)
            if b + 1 < group_end:
                continue
            state.step += 1
            saving = (
                config.save_every_steps
                and state.step % config.save_every_steps == 0
                and b + 1 < batches_per_epoch
            )
            # Several ranks must meet at the same steps to sum their losses, so they sync on a
            # step count; one process syncs on the clock.
            due = (
                state.step % SYNC_STEPS == 0
                if world.size > 1
                else time.perf_counter() - synced_at > SYNC_SECONDS
            )
            if saving or b + 1 == batches_per_epoch or due:
                # Every save is preceded by this check, so a non-finite loss never reaches a
                # checkpoint.
                values = distributed.all_reduce_sum(pending).tolist()
                value = values[0]
                if not math.isfinite(value):
                    last = run.path / "checkpoints" / "last"
                    kept = (
                        f"The last good checkpoint is kept in {last}"
                        if last.exists()
                        else "No checkpoint had been saved yet"
                    )
                    raise ClipcapError(
                        f"the loss became {value} in epoch {epoch + 1}, batches "
                        f"{synced_batch + 1}-{b + 1}; stopping. {kept}. Try a lower --lr or "
                        "--precision fp32"
                    )
                state.loss_sum += value
                for name, total in zip(objective.metrics[1:], values[1:], strict=True):
                    state.sums[name] = state.sums.get(name, 0.0) + total
                pending.zero_()
                synced_batch, synced_at = b + 1, time.perf_counter()
                shown = {"loss": f"{state.loss_sum / state.tokens:.3f}"}
                if "reward" in state.sums:
                    shown["reward"] = f"{state.sums['reward'] / state.tokens:.3f}"
                rate = state.captions / max(synced_at - started, 1e-9)
                shown["img_s" if objective.unit == "image" else "cap_s"] = f"{rate:.1f}"
                bar.set_postfix(**shown)
            optimization.step()
            state.batch = b + 1
            if saving:
                state.seconds = time.perf_counter() - started
                save_training_checkpoint(run, "last", model, state, optimization)
    finally:
        bar.close()  # before any error message, so it starts a line of its own
    seconds = time.perf_counter() - started
    return {
        "epoch": epoch + 1,
        "step": state.step,
        "train_loss": state.loss_sum / max(state.tokens, 1),
        **{name: total / max(state.tokens, 1) for name, total in state.sums.items()},
        "lr": optimization.scheduler.get_last_lr()[0],
        "seconds": round(seconds, 3),
        f"{objective.unit}s_per_second": round(state.captions / max(seconds, 1e-9), 2),
    }


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
    val_cache, val_rows = _validation_source(config, train_cache)
    device = resolve_device(config.device)
    amp_dtype = autocast_dtype(config.precision, device)
    world = distributed.world()
    if config.batch_size < world.size:
        raise ClipcapError(
            f"--batch-size {config.batch_size} is smaller than the {world.size} processes: it is "
            "the batch across all of them"
        )
    resume_state, model_config = _check_run_dir(run_dir, config, model_config, train_cache)
    init_dir = None
    if config.init and resume_state is None:  # a resumed run continues from its own weights
        init_dir, model_config = _check_init(config, model_config, train_cache)
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
        _clear_run_dir(run_dir, config)
        setup_logging(run_dir / "train.log")
        _write_run_config(run_dir, config, model.config)
    else:
        setup_logging(level=logging.WARNING)
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
        validation = _validation_set(val_cache, val_rows, tokenizer, config)
        log.info("val: %d images, %d captions", len(val_rows), len(validation.data))
    scorer = _make_scorer(config, device) if validation is not None else None

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
            _write_metrics(run_dir, state.history)

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
            _write_metrics(run_dir, state.history)
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


def _validation_set(
    val_cache: feature_cache.MappedCache, val_rows: np.ndarray, tokenizer, config: TrainConfig
) -> ValidationSet:
    data, _ = caption_data(val_cache, val_rows, tokenizer, config.max_caption_tokens)
    scored = val_rows[: config.eval_images]
    references = val_cache.references(scored)
    return ValidationSet(
        data,
        torch.from_numpy(np.asarray(val_cache.embeddings[scored])),
        references,
        CiderD(references) if references else None,
    )


def _validation_source(config: TrainConfig, train_cache):
    """The cache and rows to validate on, or (None, None) when validation is off."""
    if not config.validate:
        return None, None
    if config.val_features:
        val_cache = feature_cache.open_cache(config.val_features)
        checkpoint.check_clip_match(
            {
                "clip_model": train_cache.attrs.get("clip_model"),
                "embedding_dim": train_cache.embedding_dim,
            },
            val_cache.attrs.get("clip_model"),
            val_cache.embedding_dim,
            config.val_features,
            f"the model trained on {config.features}",
        )
        val_cache, rows = val_cache, val_cache.rows_of_split("all")
    else:
        val_cache, rows = train_cache, train_cache.rows_of_split("val")
    # Images without a reference caption (possible in caches of older versions) give no loss
    # and cannot be scored, so validation leaves them out.
    captioned = np.zeros(val_cache.num_images, dtype=bool)
    captioned[val_cache.caption_image_index] = True
    if not captioned[rows].any():
        what = (
            f"{config.val_features} has no captioned images"
            if config.val_features
            else f"{config.features} has no val split with captions"
        )
        raise ClipcapError(
            f"{what}: pass --val-features FILE, or --no-val to train without validation"
        )
    return val_cache, rows[captioned[rows]]


def _check_run_dir(
    run_dir: Path, config: TrainConfig, model_config: ModelConfig, train_cache
) -> tuple[dict | None, ModelConfig]:
    """Check the run directory against --resume/--overwrite, changing nothing.

    Returns the state to resume from (None for a new run) and the model config, which a resume
    completes from the run's own.
    """
    exists = run_dir.exists() and any(p.name in RUN_ARTEFACTS for p in run_dir.iterdir())
    if config.resume:
        last = run_dir / "checkpoints" / "last"
        train_state = checkpoint.load_train_state(last)
        saved = checkpoint.read_config(last)
        saved_model = saved["model"]
        checkpoint.check_clip_match(
            saved,
            train_cache.attrs.get("clip_model"),
            train_cache.embedding_dim,
            config.features,
            "the run being resumed",
        )
        _check_same_model(model_config, saved_model, "--resume: the run")
        for name in ("lr", "weight_decay"):
            old = saved.get("train", {}).get(name)
            if old is not None and getattr(config, name) != old:
                raise ClipcapError(
                    f"--resume: the run was trained with {option(name)} {old}; a resume restores "
                    f"its optimizer, so {option(name)} {getattr(config, name)} would be ignored"
                )
        trained_with = saved.get("train", {}).get("objective", "xe")
        if config.objective != trained_with:
            # Its position in the epoch counts captions under xe and images under scst.
            raise ClipcapError(
                f"--resume: the run trains with --objective {trained_with}, not "
                f"{config.objective}; start a new run from its checkpoint with --init instead"
            )
        if saved.get("cache_source") != train_cache.attrs.get("source"):
            log.warning("resuming on a cache made from other annotations than the run's")
        trained_on, world_size = train_state.get("world_size", 1), distributed.world().size
        if trained_on != world_size:
            raise ClipcapError(
                f"--resume: the run was trained by {trained_on} process(es), not {world_size}; "
                "resume it with the same number (torchrun --nproc-per-node)"
            )
        if train_state["captions"] % config.batch_size:
            raise ClipcapError(
                f"--resume: the run stopped {train_state['captions']} captions into epoch "
                f"{train_state['epoch'] + 1}, which is not a whole number of batches of "
                f"{config.batch_size}; resume with a --batch-size that divides it (the run used "
                f"{saved.get('train', {}).get('batch_size')})"
            )
        return train_state, replace(model_config, freeze_layers=saved_model["freeze_layers"])
    if exists and not config.overwrite:
        raise ClipcapError(
            f"{run_dir} already holds a run: pass --resume to continue it or "
            "--overwrite to replace it"
        )
    return None, model_config


def _check_same_model(model_config: ModelConfig, saved_model: dict, what: str) -> None:
    """Refuse a model config that differs from a saved one (unset fields take the saved value)."""
    for field_ in fields(ModelConfig):
        new, old = getattr(model_config, field_.name), saved_model.get(field_.name)
        if field_.name == "gpt2_model":
            new = resolve_name(new)
        if field_.name in ("freeze_layers", "clip_embedding_dim") and new is None:
            continue
        if new != old:
            raise ClipcapError(f"{what} was trained with {field_.name}={old!r}, not {new!r}")


def _check_init(
    config: TrainConfig, model_config: ModelConfig, train_cache
) -> tuple[Path, ModelConfig]:
    """The checkpoint `--init` names, checked against the cache and the model; changes nothing."""
    directory = checkpoint.resolve(config.init)
    saved = checkpoint.read_config(directory)
    checkpoint.check_clip_match(
        saved,
        train_cache.attrs.get("clip_model"),
        train_cache.embedding_dim,
        config.features,
        f"the --init checkpoint {directory}",
    )
    _check_same_model(model_config, saved["model"], f"--init: the checkpoint {directory}")
    return directory, replace(model_config, freeze_layers=saved["model"]["freeze_layers"])


def _clear_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Create the run directory; with --overwrite, remove the old run's files first."""
    try:
        if config.overwrite:
            for name in RUN_ARTEFACTS:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipcapError(f"cannot write the run directory {run_dir}: {e.strerror or e}") from None


def _write_run_config(run_dir: Path, config: TrainConfig, model_config: ModelConfig) -> None:
    write_json_atomic(
        run_dir / "config.json", {"train": asdict(config), "model": asdict(model_config)}
    )


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    try:
        write_jsonl(run_dir / "metrics.jsonl", history)
        if history:
            plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots")
    except OSError as e:
        raise ClipcapError(f"cannot write metrics in {run_dir}: {e.strerror or e}") from None


def _warmup_then_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _make_scorer(config: TrainConfig, device: torch.device):
    if not config.bertscore or config.eval_images == 0:
        return None
    return make_bertscorer(config.bertscore_model, config.bertscore_layers, device)


@torch.no_grad()
def validate(
    model: ClipCaptionModel,
    tokenizer,
    validation: ValidationSet,
    scorer,
    amp_dtype: torch.dtype | None,
    batch_size: int,
    pad_id: int,
) -> dict:
    """Mean val loss per token, and CIDEr-D and BERTScore of greedy captions on the first val images.

    `val_cider` takes its document frequencies from the references of the images it scores, as
    COCO evaluation's CIDEr does, so it equals pycocoevalcap's CIDEr on those images.
    """
    model.eval()
    device = next(model.parameters()).device
    data = validation.data
    total, tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        samples = np.arange(start, min(start + batch_size, len(data)))
        embeddings, input_ids, labels = data.batch(samples, pad_id)
        n = int((labels != IGNORE_INDEX).sum())
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(embeddings.to(device), input_ids.to(device), labels.to(device))
        total += loss.item() * n
        tokens += n
    row = {"val_loss": total / max(tokens, 1)}
    if len(validation.embeddings):
        captions = generate_captions(
            model,
            tokenizer,
            validation.embeddings,
            DecodeConfig(strategy="greedy"),
            batch_size=batch_size,
            autocast=amp_dtype,
        )
        captions = [c[0] for c in captions]
        cider = validation.cider.score(captions, validation.references)
        row["val_cider"] = float(cider.mean())
        if scorer is not None:
            row.update(bertscore(scorer, captions, validation.references))
    model.train()
    return row
