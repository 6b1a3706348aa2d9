"""Loading pretrained models from the Hugging Face hub or a local directory, with clear errors.

Every base model (CLIP, GPT-2, its tokenizer) is loaded with `from_pretrained(name_or_directory)`.
When a name cannot be resolved, because there is no network and it is not in the local cache, the
user gets one line that says so and how to pass a local directory instead.
"""

import contextlib
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
