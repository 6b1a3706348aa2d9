"""Safe file handling: atomic writes, and an exclusive lock on an output that a run owns.

An atomic write goes to a temporary name beside the target and is renamed into place, so a reader,
or a process that resumes after a crash, sees either the old file or the new one, never a
half-written one. The lock keeps two clipcap processes from writing the same output at once.
"""

import contextlib
import json
import os
import time
from pathlib import Path

from clipcap_cache.errors import ClipcapError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no lock
    fcntl = None

LOCK_WAIT_SECONDS = 1.0  # how long a held lock is retried before the output counts as in use


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2))


def read_json(path: str | Path, what: str = "file"):
    """Parse a JSON file; every way that can fail becomes one `ClipcapError` line.

    `what` names the file in the not-found message, e.g. "predictions file". Only a regular file
    is read (a FIFO would block for ever, and /dev/zero never ends), and a UTF-8 byte-order mark,
    as some Windows editors write, is allowed.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ClipcapError(f"{what} {path} is a directory, not a JSON file")
        if path.exists() and not path.is_file():
            raise ClipcapError(f"{what} {path} is not a regular file (a pipe or a device?)")
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ClipcapError(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise ClipcapError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise ClipcapError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_json(text, str(path))


def parse_json(text: str, where: str):
    """Parse JSON text from `where` (a file, a tar member); failures are one `ClipcapError` line.

    Beyond malformed text, this covers nesting too deep for Python's parser (RecursionError) and
    integers longer than Python converts (ValueError, over 4,300 digits).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ClipcapError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ClipcapError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # an integer over Python's digit limit
        raise ClipcapError(f"{where}: not readable JSON ({str(e).splitlines()[0]})") from None


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ClipcapError(f"cannot write next to {output}: {e.strerror or e}") from None
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


def make_output_dir(out: Path) -> None:
    """Create a results folder (parents too), refusing a file in its place, with one-line errors."""
    if out.exists() and not out.is_dir():
        raise ClipcapError(f"--out {out} is a file; give a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipcapError(f"cannot create --out {out}: {e.strerror or e}") from None
