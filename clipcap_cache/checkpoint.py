"""Checkpoint folders: self-describing, pickle-free, written atomically.

A checkpoint is a folder:

    model.safetensors   the projector and only the GPT-2 tensors that were trained
    config.json         format version, model config (naming the GPT-2 base), the CLIP model and
                        cache fingerprint it was trained on, the training settings, epoch, metrics
    tokenizer files     the GPT-2 tokenizer, so captioning needs nothing else from training
    train_state.pt      (last checkpoint only) optimizer, scheduler, RNG states and position,
                        read back with torch.load(weights_only=True)

The base models are named in config.json (`clip_model`, `model.gpt2_model`) by hub name or by
absolute directory; a name that starts with `./` is a folder inside the checkpoint (an export's
`base/clip`, `base/gpt2`), so the folder can be moved or shared as a whole. `resolve` takes a
checkpoint folder, a run directory or a hub id (`USER/NAME`, see `hub.download_checkpoint`), a
local folder winning over a hub id of the same name.

The folder is written as `NAME.tmp`, its files and itself flushed to disk (`files.fsync`), then
swapped in with renames, so a crash at any moment leaves either the old folder or the new one.
Readers never rename: they read whichever complete version exists (`readable_folder`); only the
trainer, holding the run's lock, finishes an interrupted swap (`recover`).
"""

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipcap_cache import __version__
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import fsync, read_json, write_json_atomic
from clipcap_cache.hub import download_checkpoint, is_hub_id
from clipcap_cache.model import (
    ClipCaptionModel,
    ModelConfig,
    build_model,
    load_tokenizer,
    trainable_state_dict,
)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
INSIDE = "./"  # a base model named "./base/clip" is that folder of the checkpoint
READ_ATTEMPTS = 50  # a reader that meets a save in progress looks again, for about a second
READ_RETRY_SECONDS = 0.02


def save_checkpoint(
    directory: str | Path,
    model: ClipCaptionModel,
    tokenizer,
    info: dict,
    train_state: dict | None = None,
) -> None:
    """Write a checkpoint folder atomically; `info` is merged into config.json."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in trainable_state_dict(model).items()
    }
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    config = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model": asdict(model.config),
        **info,
    }
    write_json_atomic(tmp / CONFIG, config)
    tokenizer.save_pretrained(str(tmp))
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    for path in tmp.iterdir():
        fsync(path)
    fsync(tmp)
    _swap_in(tmp, directory)


def _swap_in(tmp: Path, directory: Path) -> None:
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync(directory.parent)  # the renames themselves reach the disk
    shutil.rmtree(old, ignore_errors=True)


def recover(directory: str | Path) -> None:
    """Finish a swap that a crash interrupted, so `directory` exists if any version of it does.

    This renames folders, so only the process that holds the run's lock (the trainer) calls it;
    readers go through `readable_folder`, which never changes anything.
    """
    directory = Path(directory)
    tmp, old = _siblings(directory)
    if not directory.exists() and old.exists():
        # `old` exists only once `tmp` was complete, so a leftover `tmp` is the newer version.
        os.replace(tmp if tmp.exists() else old, directory)
    shutil.rmtree(old, ignore_errors=True)


def recover_run(run_dir: str | Path) -> None:
    """Finish any interrupted swap of a run's checkpoints; only for the holder of the run's lock."""
    for name in ("best", "last"):
        recover(Path(run_dir) / "checkpoints" / name)


def readable_folder(directory: str | Path) -> Path | None:
    """The folder that holds a complete version of a checkpoint, or None; changes nothing.

    Between the two renames of a save (`_swap_in`) the checkpoint is `NAME.old` (the previous
    version) and `NAME.tmp` (the new one, complete: `.old` appears only after it was written), so a
    reader takes the new one and never renames anything itself.
    """
    directory = Path(directory)
    tmp, old = _siblings(directory)
    candidates = [directory, tmp, old] if old.exists() else [directory]
    return next((c for c in candidates if _is_complete(c)), None)


def _siblings(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(directory.name + ".tmp"), directory.with_name(
        directory.name + ".old"
    )


def _is_complete(directory: Path) -> bool:
    return (directory / CONFIG).is_file() and (directory / WEIGHTS).is_file()


def _read_retrying(directory: Path, read):
    """`read(folder)` on the complete version of `directory`, again if a save moved it meanwhile.

    A trainer saving every step renames the folder under a reader; a failure is the reader's only
    when the folder it read from is still in place.
    """
    for attempt in range(READ_ATTEMPTS):
        folder = readable_folder(directory) or directory
        try:
            return read(folder)
        except Exception:
            if attempt + 1 == READ_ATTEMPTS or _is_complete(folder):
                raise
            time.sleep(READ_RETRY_SECONDS)
    raise AssertionError("unreachable")


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, a run directory (its best checkpoint), or a hub id (`USER/NAME`).

    A hub id that is not also a local path is fetched with `hub.download_checkpoint` (or found
    in the hub cache) and resolves to that local copy. Read-only: a checkpoint caught between
    the two renames of a save still resolves.
    """
    if is_hub_id(path):
        directory = download_checkpoint(str(path))
        if readable_folder(directory) is None:
            raise ClipcapError(
                f"the hub repository {path} is not a clipcap checkpoint (no {WEIGHTS} and "
                f"{CONFIG} at its top); share one with `clipcap push`"
            )
        return directory
    path = Path(path)
    for candidate in (path / "checkpoints" / "best", path):
        if readable_folder(candidate) is not None:
            return candidate
    if not path.exists():
        raise ClipcapError(f"checkpoint not found: {path}")
    last = path / "checkpoints" / "last"
    if readable_folder(last) is not None:
        raise ClipcapError(
            f"{path} has no best checkpoint yet (it is saved at the end of the first epoch); "
            f"pass --checkpoint {last} to use the latest weights"
        )
    raise ClipcapError(f"{path} is not a checkpoint folder or a run directory (no {WEIGHTS})")


def read_config(path: str | Path) -> dict:
    """The config.json of a checkpoint, checked for its format version."""
    directory = resolve(path)
    config = _read_retrying(
        directory, lambda folder: read_json(folder / CONFIG, "checkpoint config")
    )
    if not isinstance(config, dict) or "format_version" not in config:
        raise ClipcapError(f"{directory} is not a clipcap checkpoint: no format_version")
    version = config["format_version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ClipcapError(
            f"{directory} has checkpoint format version {version!r}, but this version of "
            f"clipcap-cache reads only version {FORMAT_VERSION}"
        )
    if not isinstance(config.get("model"), dict):
        raise ClipcapError(f"{directory / CONFIG} has no 'model' section")
    for key, kind in (("clip_model", str), ("embedding_dim", int)):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ClipcapError(f"{directory / CONFIG}: '{key}' is {config.get(key)!r}")
    return locate_base_models(config, directory)


def locate_base_models(config: dict, directory: Path) -> dict:
    """A copy of `config` whose base models named `./PATH` are that folder of `directory`, absolute.

    Every stage reads a checkpoint's config through `read_config`, so every stage loads a
    self-contained export's `base/clip` and `base/gpt2` wherever the folder was moved.
    """

    def located(name):
        if isinstance(name, str) and name.startswith(INSIDE):
            return str(directory.resolve() / name[len(INSIDE) :])
        return name

    model = dict(config["model"])
    if "gpt2_model" in model:
        model["gpt2_model"] = located(model["gpt2_model"])
    return {**config, "clip_model": located(config["clip_model"]), "model": model}


def check_clip_match(
    expected: dict,
    clip_model: str | None,
    embedding_dim: int,
    what: str,
    trained: str,
    clip_fingerprint: str | None = None,
) -> None:
    """Refuse image embeddings of another CLIP model, or another size, than a model was trained on.

    `expected` holds the `clip_model`, `embedding_dim` and `clip_fingerprint` recorded with the
    model (a checkpoint's config.json, or a training cache's). `what` names the embeddings' source
    (a cache file, a CLIP model) and `trained` what they are checked against. `clip_fingerprint`
    is the source's fingerprint of the CLIP weights (`fingerprints.pretrained_fingerprint`): two
    models of one name and shape are told apart by it. A side that records none (a file written
    before fingerprints were) is not checked for it. Training, evaluation, captioning, serving,
    extraction and `embed-text` all call this one check.
    """
    if embedding_dim != expected.get("embedding_dim"):
        raise ClipcapError(
            f"{what} holds {embedding_dim}-d CLIP embeddings, but {trained} expects "
            f"{expected.get('embedding_dim')}-d"
        )
    if clip_model != expected.get("clip_model"):
        raise ClipcapError(
            f"{what} comes from CLIP model {clip_model}, but {trained} was trained on "
            f"{expected.get('clip_model')} features; use features of that CLIP model"
        )
    recorded = expected.get("clip_fingerprint")
    if recorded is not None and clip_fingerprint is not None and recorded != clip_fingerprint:
        raise ClipcapError(
            f"{what} comes from other CLIP weights than {trained} (weights fingerprint "
            f"{clip_fingerprint}, not {recorded}): the model at {clip_model} was replaced by "
            "another of the same shape, and embeddings of two CLIP models do not mix; put the "
            "original model back at that name, or make the embeddings again with this one "
            "(extract-features, embed-text) and train on them"
        )


def check_base(model: ClipCaptionModel, saved: dict, trained: str) -> None:
    """Refuse a base GPT-2 other than the one a checkpoint was trained on.

    `saved` is the checkpoint's config; one saved before base models were fingerprinted is not
    checked. Caption, evaluate, serve, --init and --resume all call this one check.
    """
    recorded = saved.get("gpt2_fingerprint")
    known = {model.base_fingerprint, getattr(model, "legacy_base_fingerprint", None)}
    if recorded is not None and recorded not in known:
        raise ClipcapError(
            f"the GPT-2 at {model.config.gpt2_model} is not the one {trained} was trained on "
            f"(weights fingerprint {model.base_fingerprint}, not {recorded}): the checkpoint "
            "holds only the trained tensors, so put that model back at this path"
        )


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """Build the model from a checkpoint's config and load its trained tensors.

    Returns `(model, tokenizer, config)`.
    """
    directory = resolve(path)
    config = read_config(directory)
    try:
        model_config = ModelConfig(**config["model"])
    except TypeError as e:
        raise ClipcapError(f"{directory / CONFIG}: bad model section ({e})") from None
    model = build_model(model_config)
    check_base(model, config, f"the checkpoint {directory}")

    def read(folder: Path):
        load_weights(model, folder / WEIGHTS)
        return load_tokenizer(str(folder))

    tokenizer = _read_retrying(directory, read)
    return model.to(device).eval(), tokenizer, config


def load_weights(model: ClipCaptionModel, weights: Path) -> None:
    """Load trained tensors into a freshly built model, refusing any mismatch."""
    try:
        tensors = load_file(str(weights))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ClipcapError(f"cannot read {weights}: {e}") from None
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ClipcapError(
            f"{weights} does not match its model config: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ClipcapError(
                f"{weights}: {name} has shape {tuple(tensor.shape)}, the model "
                f"expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def load_train_state(directory: str | Path) -> dict:
    """The resumable training state of a `last/` checkpoint, read without pickle.

    Read-only, like every reader: a swap that a crash interrupted is read through, not finished
    (the trainer finishes it with `recover`, holding the run's lock).
    """
    directory = Path(directory)

    def read(folder: Path) -> dict:
        path = folder / TRAIN_STATE
        if not path.is_file():
            if _is_complete(folder) or not folder.exists():
                raise ClipcapError(f"nothing to resume: {directory / TRAIN_STATE} not found")
            raise FileNotFoundError(path)  # moved by a save meanwhile: read again
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # any unreadable state is the user's to fix, not a crash
            raise ClipcapError(f"cannot read {path}: {str(e).splitlines()[0]}") from None

    return _read_retrying(directory, read)
