"""Loading pretrained models from the Hugging Face hub or a local directory, with clear errors.

Every base model (CLIP, GPT-2, its tokenizer) is loaded with `from_pretrained(name_or_directory)`.
When a name cannot be resolved, because there is no network and it is not in the local cache, the
user gets one line that says so and how to pass a local directory instead.

Checkpoints shared on the hub are fetched here too (`download_checkpoint`, through
`huggingface_hub.snapshot_download`, which honours `HF_HUB_OFFLINE` and the hub cache), and
`hub_library` is the one lazy import of `huggingface_hub` for the commands that need it: it is
the optional extra `hub`, and a missing one is one line naming it.
"""

import contextlib
import re
from pathlib import Path

import transformers

from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import refuse_file


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars (unused text-tower keys and the like)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def resolve_name(name_or_dir: str) -> str:
    """Make a local directory absolute, so that files recording it work from anywhere."""
    path = Path(name_or_dir).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_dir


def load_pretrained(loader, name_or_dir: str, what: str, **kwargs):
    """Call `loader(name_or_dir, **kwargs)` (a `from_pretrained`), turning failures into one line."""
    path = Path(name_or_dir).expanduser()
    refuse_file(path, f"{what} '{name_or_dir}' is a file; pass a model directory or a hub name")
    if not path.exists() and looks_local(name_or_dir):
        # A folder that is gone (moved or deleted since a run recorded it): never a hub name.
        raise ClipcapError(
            f"cannot load {what}: the local folder {name_or_dir} does not exist (any more); put "
            "the model back there, or pass the folder where it is now"
        )
    try:
        with quiet_transformers():
            return loader(str(path) if path.is_dir() else name_or_dir, **kwargs)
    except OSError as e:
        if path.is_dir():
            raise ClipcapError(
                f"cannot load {what} from directory {path}: {_first_line(e)}"
            ) from None
        raise ClipcapError(
            f"cannot load {what} '{name_or_dir}': it is not a local directory and could not be "
            "fetched from the Hugging Face hub (no network, or not in the local cache). Download it "
            f"where the hub is reachable (`hf download {name_or_dir} --local-dir DIR`) and pass DIR."
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ClipcapError(f"cannot load {what} '{name_or_dir}': {_first_line(e)}") from None


def looks_local(name_or_dir: str) -> bool:
    """Whether a model name is a filesystem path rather than a hub name (`org/name`).

    Absolute paths (which runs record for local models), `~`, `./` and `../` paths, and names
    with more than one `/` (a hub id has at most one) are paths.
    """
    name = str(name_or_dir)
    return (
        Path(name).expanduser().is_absolute()
        or name.startswith(("./", "../", "~"))
        or name.count("/") > 1
    )


def _first_line(error: Exception, limit: int = 200) -> str:
    """The first line of a library's message, cut short: some list every model class."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."


HUB_EXTRA = "hub"
# A hub repository id: one namespace and one name of letters, digits, "-", "_" and "." (the
# hub's own rule, `huggingface_hub.utils.validate_repo_id`, written out so that it is checked
# even where huggingface_hub is missing).
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
_MODEL_NAME = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")  # also a namespace-less "gpt2"


def is_repo_id(name: str) -> bool:
    """Whether `name` is spelled like a hub repository id, `USER/NAME`."""
    return _valid(_REPO_ID, name)


def is_model_name(name: str) -> bool:
    """Whether `name` is spelled like a hub model name: `USER/NAME`, or a bare `NAME` (`gpt2`)."""
    return _valid(_MODEL_NAME, name)


def _valid(pattern: re.Pattern, name: str) -> bool:
    return (
        len(name) <= 96
        and pattern.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
    )


def is_hub_id(name: str | Path) -> bool:
    """Whether a checkpoint argument names a hub repository: `USER/NAME`, and no local path.

    A local folder of that name wins, so `runs/coco` stays a folder wherever it exists.
    """
    return not Path(name).exists() and is_repo_id(str(name))


def hub_library():
    """The `huggingface_hub` module, imported on first use; missing, one line naming the extra."""
    try:
        import huggingface_hub
    except ImportError:
        raise ClipcapError(
            f'this needs the huggingface_hub package: pip install "clipcap-cache[{HUB_EXTRA}]"'
        ) from None
    return huggingface_hub


def is_offline() -> bool:
    """Whether the hub is switched off (`HF_HUB_OFFLINE=1`), as huggingface_hub itself decides."""
    return bool(hub_library().constants.is_offline_mode())


def download_checkpoint(repo_id: str) -> Path:
    """The local folder of a checkpoint shared on the hub as `repo_id`, downloaded if need be.

    `snapshot_download` looks in the hub cache first and, offline (`HF_HUB_OFFLINE=1`), only
    there; every way it can fail is one line.
    """
    hf = hub_library()
    errors = hf.errors
    try:
        return Path(hf.snapshot_download(repo_id))
    except errors.RepositoryNotFoundError:  # also a gated repository one may not read
        raise ClipcapError(
            f"checkpoint not found: {repo_id} is neither a local folder nor a model on the "
            "Hugging Face hub (a private one needs `hf auth login`)"
        ) from None
    except errors.LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE is set, so it was not downloaded"
            if is_offline()
            else "the hub could not be reached to download it"
        )
        raise ClipcapError(
            f"checkpoint not found: {repo_id} is neither a local folder nor in the hub cache "
            f"({hf.constants.HF_HUB_CACHE}); {why}"
        ) from None
    except OSError as e:  # HTTP errors, a cache that cannot be written
        raise ClipcapError(
            f"cannot download {repo_id} from the Hugging Face hub: {_first_line(e)}"
        ) from None
