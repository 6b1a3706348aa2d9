"""Safe file handling: atomic writes, one-line errors for the file system, and output locks.

An atomic write goes to a temporary name beside the target, is flushed to disk and renamed into
place, so a reader, or a process that resumes after a crash, sees either the old file or the new
one, never a half-written one. The lock keeps two clipcap processes from writing the same output
at once. Every stage reads JSON, creates output folders and reports file-system failures through
the helpers here, so each of those rules is written once.
"""

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from clipcap_cache.errors import ClipcapError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no lock
    fcntl = None

LOCK_WAIT_SECONDS = 1.0  # how long a held lock is retried before the output counts as in use


@contextlib.contextmanager
def os_errors(message: str, hint: str = "") -> Iterator[None]:
    """Turn an `OSError` raised in the block into one `ClipcapError` line.

    The line is `MESSAGE: REASON` (the system's reason, e.g. "No space left on device"), then
    `hint` when given. Other exceptions pass through unchanged.
    """
    try:
        yield
    except OSError as e:
        raise ClipcapError(f"{message}: {e.strerror or e}{hint}") from None


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries (its renames), to disk."""
    is_dir = Path(path).is_dir()
    if is_dir and os.name == "nt":  # Windows cannot open a folder; its renames are durable
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # A few file systems cannot flush a folder: its renames are then as durable as they get.
        if not (is_dir and e.errno == errno.EINVAL):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, it replaces `path`.

    The temporary file is flushed to disk, renamed over `path`, and the folder's entry flushed
    too, so a crash leaves the old file or the new one. When the block raises, the temporary
    file is removed and `path` is left as it was. The name holds the process id, so processes
    writing the same file at once do not share one.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2))


def read_json(path: str | Path, what: str = "file", lines: bool = False):
    """Parse a JSON file; every way that can fail becomes one `ClipcapError` line.

    `what` names the file in the not-found message, e.g. "predictions file". With `lines`, the
    file is JSON lines: a list of the values of its non-blank lines. Only a regular file is read
    (a FIFO would block for ever, and /dev/zero never ends), and a UTF-8 byte-order mark, as some
    Windows editors write, is allowed.
    """
    path = Path(path)
    with os_errors(f"cannot read {path}"):
        if path.is_dir():
            raise ClipcapError(f"{what} {path} is a directory, not a JSON file")
        if path.exists() and not path.is_file():
            raise ClipcapError(f"{what} {path} is not a regular file (a pipe or a device?)")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            raise ClipcapError(f"{what} not found: {path}") from None
        except UnicodeDecodeError:
            raise ClipcapError(f"{path}: not a UTF-8 text file") from None
    if not lines:
        return parse_json(text, str(path))
    numbered = enumerate(text.splitlines(), start=1)
    return [parse_json(line, str(path), number) for number, line in numbered if line.strip()]


def parse_json(text: str, where: str, line: int | None = None):
    """Parse JSON text from `where` (a file, a tar member); failures are one `ClipcapError` line.

    `line` is the text's line number in a JSON lines file. Beyond malformed text, this covers
    nesting too deep for Python's parser (RecursionError) and integers longer than Python
    converts (ValueError, over 4,300 digits).
    """
    at = f" (line {line})" if line is not None else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        position = f"line {line or e.lineno}, column {e.colno}"
        raise ClipcapError(f"{where}: not valid JSON ({position})") from None
    except RecursionError:
        raise ClipcapError(f"{where}: JSON nested too deeply to read{at}") from None
    except ValueError as e:  # an integer over Python's digit limit
        raise ClipcapError(f"{where}: not readable JSON{at} ({str(e).splitlines()[0]})") from None


def lock_path(output: str | Path) -> Path:
    """The lock file of an output: `NAME.lock` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


@contextlib.contextmanager
def exclusive_lock(output: str | Path):
    """Hold an exclusive lock on `output` while the block runs, or refuse with one line.

    The lock is an `flock` on `NAME.lock` beside the output, holding the owner's pid. The kernel
    drops an flock when its process dies, so a killed run never leaves a stale lock. The parent
    folder is created if needed.
    """
    path = lock_path(output)
    with os_errors(f"cannot write next to {output}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            if not _try_flock(fd, LOCK_WAIT_SECONDS):
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise ClipcapError(f"{output} is in use by another clipcap process (pid {owner})")
            if os.fstat(fd).st_ino != _inode(path):
                # The holder removed this lock file as we opened it: it has just finished.
                raise ClipcapError(f"{output} was just released by another process; run again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)  # releases the flock


def _try_flock(fd: int, seconds: float) -> bool:
    """Take the flock, retrying for a moment.

    A process killed just before lets go of its lock some milliseconds after it has exited.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def refuse_file(path: str | Path, message: str) -> None:
    """Refuse, with `message`, a path that should be a folder (or not exist yet) but is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ClipcapError(message)


def refuse_folder(path: str | Path, message: str) -> None:
    """Refuse, with `message`, a path that should be a file (or not exist yet) but is a folder."""
    if Path(path).is_dir():
        raise ClipcapError(message)


def require_file(path: str | Path, what: str) -> None:
    """Refuse a path that is not a regular file, saying what it is instead.

    `what` names it, e.g. "feature cache": "not found" only when nothing is there; a folder, a
    FIFO or a device (/dev/zero) is named as such.
    """
    path = Path(path)
    if path.is_file():
        return
    if path.is_dir():
        raise ClipcapError(f"{what} {path} is a directory, not a file")
    if path.exists():
        raise ClipcapError(f"{what} {path} is not a regular file (a pipe or a device?)")
    raise ClipcapError(f"{what} not found: {path}")


def make_folder(path: str | Path, option: str, purpose: str) -> None:
    """Create the folder an option names (parents too), refusing a file in its place.

    E.g. `make_folder(out, "--out", "the results")`; every failure is one `ClipcapError` line.
    """
    path = Path(path)
    refuse_file(path, f"{option} {path} is a file; give a folder for {purpose}")
    with os_errors(f"cannot create {option} {path}"):
        path.mkdir(parents=True, exist_ok=True)
