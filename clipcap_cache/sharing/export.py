"""`clipcap export`: a checkpoint as a self-contained folder, ready to share on the hub.

    clipcap export runs/coco shared/coco-clipcap
    clipcap export runs/coco shared/coco-clipcap --self-contained
    clipcap export runs/coco shared/coco-clipcap --base-clip openai/clip-vit-base-patch32

The folder is a checkpoint folder that loads from anywhere (`clipcap caption --checkpoint DIR`,
or from the hub by id once pushed): `model.safetensors` (the trained tensors), `config.json`, the
tokenizer files and `README.md`, the model card (`card.py`). The training state is left out.

The frozen base models are not in the weights. One that the checkpoint names by hub name is
named the same way; one loaded from a local directory makes the export refuse, unless
`--self-contained` copies it into `base/clip` or `base/gpt2` (named `./base/...` in config.json,
which `checkpoint.read_config` finds inside the folder), or `--base-clip NAME` / `--base-gpt2
NAME` say which hub model the directory is a copy of. Local paths of the training settings are
cut to their file names: a shared config names no folder of the machine it came from.

Every input is checked before anything is written. The folder is built under a temporary name
beside DIR, flushed to disk and renamed into place, so DIR is the old folder or the new one,
never half of one.
"""

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from clipcap_cache import checkpoint
from clipcap_cache.checks import check_types
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import fsync, os_errors, read_json, write_json_atomic, write_text_atomic
from clipcap_cache.hub import is_model_name, is_repo_id
from clipcap_cache.options import Option, option
from clipcap_cache.sharing.card import BaseModel, Evaluation, model_card

log = logging.getLogger(__name__)

BASE_FOLDER = "base"
CARD = "README.md"
# Files of a checkpoint folder that an export writes itself or leaves out; the rest (the
# tokenizer's) are copied as they are.
NOT_COPIED = {checkpoint.CONFIG, checkpoint.WEIGHTS, checkpoint.TRAIN_STATE, CARD}

# The options `export` and `push` share.
SELF_CONTAINED = Option(
    False, help="Copy local base models into the folder (base/clip, base/gpt2)."
)
BASE_CLIP = Option(
    None, help="Hub name of the CLIP model a local CLIP directory is a copy of.", metavar="NAME"
)
BASE_GPT2 = Option(
    None, help="Hub name of the GPT-2 model a local GPT-2 directory is a copy of.", metavar="NAME"
)
LICENSE = Option("mit", help="The license the model card gives (a hub license id).")
DATASETS = Option(
    default_factory=list,
    cli_type=list[str],
    flags=("--dataset",),
    metavar="ID",
    default_text="none",
    help="A hub dataset the model was trained on, for the card; repeatable.",
)


@dataclass
class ExportConfig:
    """Settings of `clipcap export`: which checkpoint, where to, and how to name its bases."""

    source: str = option(
        help="Run directory, checkpoint folder or hub id.",
        argument=True,
        metavar="RUN_OR_CHECKPOINT",
    )
    out: str = option(help="The folder to write.", argument=True, metavar="DIR")
    self_contained: bool = SELF_CONTAINED.field()
    base_clip: str | None = BASE_CLIP.field()
    base_gpt2: str | None = BASE_GPT2.field()
    license: str = LICENSE.field()
    datasets: list = DATASETS.field()
    repo: str | None = option(
        None, help="The hub id it will be shared as (USER/NAME), for the card.", metavar="ID"
    )
    overwrite: bool = option(False, help="Replace DIR when it is not empty.")

    def __post_init__(self):
        check_types(self)
        check_sharing_options(self)
        if self.repo is not None and not is_repo_id(self.repo):
            raise ClipcapError(f"--repo {self.repo!r} is not a hub repository id (USER/NAME)")


def check_sharing_options(config) -> None:
    """Refuse bad values of the options `export` and `push` share (`--base-clip`, ...)."""
    for flag, name in (("--base-clip", config.base_clip), ("--base-gpt2", config.base_gpt2)):
        if name is not None and not is_model_name(name):
            raise ClipcapError(f"{flag} {name!r} is not a hub model name (such as USER/NAME)")
    for dataset in config.datasets:
        if not isinstance(dataset, str) or not is_model_name(dataset):
            raise ClipcapError(f"--dataset {dataset!r} is not a hub dataset id (such as USER/NAME)")
    if not is_model_name(config.license):  # hub license ids: mit, apache-2.0, cc-by-4.0, ...
        raise ClipcapError(f"--license {config.license!r} is not a license id (such as mit)")


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export writes, decided and checked before anything is."""

    source: Path  # the checkpoint folder
    out: Path
    config: dict  # the exported config.json
    bases: tuple[BaseModel, BaseModel]  # CLIP, GPT-2
    copies: dict[str, Path]  # base folder name -> local directory to copy there
    card: str
    overwrite: bool  # whether a DIR that holds files may be replaced


def export(config: ExportConfig) -> Path:
    """Write the export folder `config.out`; returns it. See the module docstring."""
    plan = plan_export(config)
    write_export(plan)
    return plan.out


def plan_export(config: ExportConfig) -> ExportPlan:
    """Check every input of an export and decide its contents; writes nothing."""
    source = checkpoint.resolve(config.source)
    saved = checkpoint.read_config(source)
    out = Path(config.out).expanduser()
    check_destination(out, source, config.overwrite)
    weights = weight_counts(source / checkpoint.WEIGHTS)
    clip = base_model("CLIP", "clip", saved["clip_model"], config.base_clip, config)
    gpt2_name = saved["model"].get("gpt2_model", "gpt2")
    gpt2 = base_model("GPT-2", "gpt2", gpt2_name, config.base_gpt2, config)
    local = [b for b in (clip, gpt2) if b.local and b.reference is None]
    if local:
        found = ", ".join(f"{b.what} {b.source}" for b in local)
        raise ClipcapError(
            f"the checkpoint's base models must be shared too, but these are local directories "
            f"({found}): pass --self-contained to copy them into the export, or "
            + " / ".join(f"--base-{b.folder} NAME" for b in local)
            + " to name the hub model each is a copy of"
        )
    copies = {}
    for base in (clip, gpt2):
        if base.copied:
            if not Path(base.source).is_dir():
                raise ClipcapError(
                    f"--self-contained: the {base.what} directory {base.source} that the "
                    f"checkpoint names no longer exists; pass --base-{base.folder} NAME instead"
                )
            copies[base.folder] = Path(base.source)
    exported = exported_config(saved, clip, gpt2)
    card = model_card(
        exported,
        title=config.repo.split("/")[1] if config.repo else out.name,
        repo=config.repo,
        folder=out.name,
        bases=(clip, gpt2),
        weights=weights,
        evaluations=find_evaluations(source, saved),
        license=config.license,
        datasets=list(config.datasets),
    )
    return ExportPlan(source, out, exported, (clip, gpt2), copies, card, config.overwrite)


def check_destination(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse a destination that is a file, holds files (without --overwrite), or the source."""
    if out.exists() and not out.is_dir():
        raise ClipcapError(f"{out} is a file; give a folder to export to")
    target, origin = out.resolve(), source.resolve()
    if target == origin or target in origin.parents or origin in target.parents:
        raise ClipcapError(
            f"{out} holds or is inside the checkpoint {source}; export to a folder of its own"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ClipcapError(f"{out} is not empty: pass --overwrite to replace it")


def base_model(what: str, folder: str, name: str, hub_name: str | None, config) -> BaseModel:
    """How the export refers to a base model the checkpoint names `name`.

    A hub name stays; a local directory (recorded absolute) is named `hub_name` if given, is
    copied into `base/FOLDER` with `--self-contained`, and is left unresolved (`reference` None)
    otherwise, for the caller to refuse.
    """
    local = Path(name).is_absolute() or Path(name).expanduser().is_dir()
    if not local:
        if hub_name is not None and hub_name != name:
            raise ClipcapError(
                f"--base-{folder} {hub_name}: the checkpoint's {what} model is the hub model "
                f"{name}, not a local directory; leave --base-{folder} out"
            )
        return BaseModel(what, folder, name, name, local=False)
    if hub_name is not None:
        return BaseModel(what, folder, name, hub_name, local=True)
    if config.self_contained:
        reference = f"{checkpoint.INSIDE}{BASE_FOLDER}/{folder}"
        return BaseModel(what, folder, name, reference, local=True, copied=True)
    return BaseModel(what, folder, name, None, local=True)


def weight_counts(weights: Path) -> dict[str, int]:
    """Trained parameters in a weights file by top-level module (`projector`, `gpt2`).

    Read from the file's header alone: a checkpoint holds exactly the trainable tensors.
    """
    counts: dict[str, int] = {}
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                numel = 1
                for size in tensors.get_slice(name).get_shape():
                    numel *= size
                group = name.split(".")[0]
                counts[group] = counts.get(group, 0) + numel
    except (SafetensorError, OSError) as e:
        raise ClipcapError(f"cannot read {weights}: {e}") from None
    return counts


def exported_config(saved: dict, clip: BaseModel, gpt2: BaseModel) -> dict:
    """The config.json of the export: the base models as it names them, no local paths."""
    train = {
        key: Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value
        for key, value in saved.get("train", {}).items()
    }
    return {
        **saved,
        "clip_model": clip.reference,
        "model": {**saved["model"], "gpt2_model": gpt2.reference},
        "train": train,
    }


def find_evaluations(source: Path, saved: dict) -> list[Evaluation]:
    """The `clipcap evaluate` results of this checkpoint in its run (or beside it).

    Evaluate's default folders: `RUN/eval-SPLIT*` for a run's checkpoints, `FOLDER-eval-SPLIT`
    beside a checkpoint that is not in a run. A result is this checkpoint's when it names a folder
    of the same name (`best`, `last`) and, where it records one, the same step: an evaluation of
    an earlier best is left out.
    """
    if source.parent.name == "checkpoints":
        candidates = sorted(source.parent.parent.glob("eval-*/metrics.json"))
    else:
        candidates = sorted(source.parent.glob(f"{source.name}-eval-*/metrics.json"))
    found = []
    for path in candidates:
        try:
            result = read_json(path, "evaluation results")
        except ClipcapError as e:
            log.warning("left out of the model card: %s", e)
            continue
        if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
            continue
        if Path(str(result.get("checkpoint", ""))).name != source.name:
            continue
        step = result.get("checkpoint_step")
        if step is not None and step != saved.get("step"):
            log.warning("left out of the model card: %s evaluated an earlier save", path.parent)
            continue
        found.append(
            Evaluation(
                folder=path.parent.name,
                split=str(result.get("split", "?")),
                images=result.get("images"),
                metrics={k: v for k, v in result["metrics"].items() if isinstance(v, int | float)},
                decode=result.get("decode"),
                features=Path(str(result.get("features", ""))).name or None,
                step_recorded=step is not None,
            )
        )
    return found


def write_export(plan: ExportPlan) -> None:
    """Build the export under a temporary name beside `plan.out`, then rename it into place."""
    parent = plan.out.parent
    with os_errors(f"cannot create the folder {parent}"):
        parent.mkdir(parents=True, exist_ok=True)
    with os_errors(f"cannot write {plan.out}"):
        # Beside DIR, so that the last step is a rename; named by the process, so that two
        # exports to one DIR do not share it; made with mkdir, so that it has the umask's mode.
        tmp = parent / f".{plan.out.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _fill(tmp, plan)
            _swap_in(tmp, plan.out, plan.overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _fill(folder: Path, plan: ExportPlan) -> None:
    shutil.copyfile(plan.source / checkpoint.WEIGHTS, folder / checkpoint.WEIGHTS)
    for path in sorted(plan.source.iterdir()):
        if path.is_file() and path.name not in NOT_COPIED and not path.name.startswith("."):
            shutil.copyfile(path, folder / path.name)  # a hub snapshot's links are followed
    write_json_atomic(folder / checkpoint.CONFIG, plan.config)
    write_text_atomic(folder / CARD, plan.card)
    for name, directory in plan.copies.items():
        shutil.copytree(
            directory,
            folder / BASE_FOLDER / name,
            ignore=shutil.ignore_patterns(".git", ".cache"),
        )
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        fsync(path)
    fsync(folder)


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` (empty, or replaced with --overwrite) goes last."""
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # filled since it was checked
        raise ClipcapError(f"{out} is not empty: pass --overwrite to replace it")
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
