"""The run directory: its checks against --resume, --overwrite and --init, and its writes."""

import json
import logging
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from clipcap_cache import checkpoint, distributed
from clipcap_cache.checks import option
from clipcap_cache.data import cache as feature_cache
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import os_errors, write_json_atomic
from clipcap_cache.hub import resolve_name
from clipcap_cache.logs import write_jsonl
from clipcap_cache.model import ClipCaptionModel, ModelConfig
from clipcap_cache.training import batches, trackers
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.data import MappedFiles
from clipcap_cache.training.optimization import Optimization
from clipcap_cache.training.plots import plot_metrics
from clipcap_cache.training.state import TrainState, capture_rng

log = logging.getLogger(__name__)


RUN_ARTEFACTS = ("checkpoints", "config.json", "train.log", "metrics.jsonl", "plots")


@dataclass(frozen=True)
class RunDirectory:
    """A run's folder, and what each of its checkpoints records beside the weights."""

    path: Path
    tokenizer: object  # saved into every checkpoint, so captioning needs nothing else
    info: dict  # clip_model, cache_source, embedding_dim and the training settings
    mapped: MappedFiles | None = None  # the memory-mapped inputs, checked at every read-back


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
        train_state = {
            **state.state_dict(),
            **optimization.state_dict(),
            **capture_rng(device),
        }
    if not distributed.is_main_process():
        return
    with os_errors(
        f"cannot write checkpoint {run.path / 'checkpoints' / name}",
        "; the last complete checkpoint is kept. Free space or fix permissions, then --resume",
    ):
        checkpoint.save_checkpoint(
            run.path / "checkpoints" / name,
            model,
            run.tokenizer,
            {**run.info, "epoch": state.epoch, "step": state.step, "metrics": metrics},
            train_state,
        )


def check_run_dir(
    run_dir: Path, config: TrainConfig, model_config: ModelConfig, train_cache
) -> tuple[dict | None, ModelConfig]:
    """Check the run directory against --resume/--overwrite, changing nothing.

    Returns the state to resume from (None for a new run) and the model config, which a resume
    completes from the run's own.
    """
    exists = run_dir.exists() and any(p.name in RUN_ARTEFACTS for p in run_dir.iterdir())
    if exists and not is_run(run_dir):
        # A model folder, a checkpoint or anything else with a config.json: never a run to
        # resume, and never deleted by --overwrite.
        raise ClipcapError(
            f"--out {run_dir} holds files that are not a clipcap run (such as "
            f"{sorted(p.name for p in run_dir.iterdir() if p.name in RUN_ARTEFACTS)[0]}); "
            "give another --out"
        )
    if config.resume:
        last = run_dir / "checkpoints" / "last"
        train_state = checkpoint.load_train_state(last)
        saved = checkpoint.read_config(last)
        saved_model = saved["model"]
        checkpoint.check_clip_match(
            saved,
            feature_cache.recorded_clip_model(train_cache.attrs),
            train_cache.embedding_dim,
            config.features,
            "the run being resumed",
            feature_cache.recorded_clip_fingerprint(train_cache.attrs),
        )
        check_same_model(model_config, saved_model, "--resume: the run")
        for name in ("lr", "weight_decay"):
            old = saved.get("train", {}).get(name)
            if old is not None and getattr(config, name) != old:
                raise ClipcapError(
                    f"--resume: the run was trained with {option(name)} {old}; a resume restores "
                    f"its optimizer, so {option(name)} {getattr(config, name)} would be ignored"
                )
        for name in ("retrieval", "datastore", "retrieval_template", "retrieval_separator"):
            old = saved.get("train", {}).get(name, getattr(TrainConfig, name, None))
            if getattr(config, name) != old:
                raise ClipcapError(
                    f"--resume: the run was trained with {option(name)} {old!r}, not "
                    f"{getattr(config, name)!r}: its prompts would change mid-run"
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
        progress = TrainState.from_state_dict(train_state)
        if progress.samples_done % config.batch_size:
            raise ClipcapError(
                f"--resume: the run stopped {progress.samples_done} captions into epoch "
                f"{progress.epoch + 1}, which is not a whole number of batches of "
                f"{config.batch_size}; resume with a --batch-size that divides it (the run used "
                f"{saved.get('train', {}).get('batch_size')})"
            )
        batches.check_resume(saved.get("train", {}), config, progress.samples_done)
        return train_state, replace(model_config, freeze_layers=saved_model["freeze_layers"])
    if exists and not config.overwrite:
        raise ClipcapError(
            f"{run_dir} already holds a run: pass --resume to continue it or "
            "--overwrite to replace it"
        )
    return None, model_config


def is_run(run_dir: Path) -> bool:
    """Whether a folder that holds run files is a clipcap run, which --overwrite may replace.

    It is, with `checkpoints/` or a run's own config.json (with `train` and `model` sections),
    or with no config.json at all (only a log, metrics or plots). A checkpoint folder (which
    holds `model.safetensors`) or a Hugging Face model folder (its own config.json) is not.
    """
    if (run_dir / checkpoint.WEIGHTS).exists():
        return False
    if (run_dir / "checkpoints").is_dir() or not (run_dir / "config.json").exists():
        return True
    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(saved, dict) and all(
        isinstance(saved.get(section), dict) for section in ("train", "model")
    )


def check_same_model(model_config: ModelConfig, saved_model: dict, what: str) -> None:
    """Refuse a model config that differs from a saved one (unset fields take the saved value)."""
    for field_ in fields(ModelConfig):
        new, old = getattr(model_config, field_.name), saved_model.get(field_.name)
        if field_.name == "gpt2_model":
            new = resolve_name(new)
        if field_.name in ("freeze_layers", "clip_embedding_dim") and new is None:
            continue
        if new != old:
            raise ClipcapError(f"{what} was trained with {field_.name}={old!r}, not {new!r}")


def check_init(
    config: TrainConfig, model_config: ModelConfig, train_cache
) -> tuple[Path, ModelConfig]:
    """The checkpoint `--init` names, checked against the cache and the model; changes nothing."""
    directory = checkpoint.resolve(config.init)
    saved = checkpoint.read_config(directory)
    checkpoint.check_clip_match(
        saved,
        feature_cache.recorded_clip_model(train_cache.attrs),
        train_cache.embedding_dim,
        config.features,
        f"the --init checkpoint {directory}",
        feature_cache.recorded_clip_fingerprint(train_cache.attrs),
    )
    check_same_model(model_config, saved["model"], f"--init: the checkpoint {directory}")
    return directory, replace(model_config, freeze_layers=saved["model"]["freeze_layers"])


def prepare_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Create the run directory (and its parents); with --overwrite, remove the old run's files first.

    The first write of a run: call it only once every input is checked.
    """
    with os_errors(f"cannot write the run directory {run_dir}"):
        if config.overwrite:
            # The trackers' files of the old run go too; a resume would reopen its runs.
            for name in RUN_ARTEFACTS + trackers.RUN_FILES:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)


def write_run_config(run_dir: Path, config: TrainConfig, model_config: ModelConfig) -> None:
    write_json_atomic(
        run_dir / "config.json", {"train": asdict(config), "model": asdict(model_config)}
    )


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    with os_errors(f"cannot write metrics in {run_dir}"):
        write_jsonl(run_dir / "metrics.jsonl", history)
        if history:
            plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots")
