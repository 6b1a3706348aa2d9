"""Logging to the console and a run's log file, and the per-epoch metrics file.

One formatter serves both handlers. Metrics go to `metrics.jsonl`, one JSON object per epoch,
rewritten atomically from the run's history so a resumed run never holds stale rows.
"""

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from clipcap_cache.files import read_json, write_text_atomic

FORMAT = "%(asctime)s %(levelname)s %(message)s"
PACKAGE_LOGGER = "clipcap_cache"


def setup_logging(log_file: str | Path | None = None, level: int | None = None) -> logging.Logger:
    """Send the package's log records to stderr and, if given, to `log_file` (appended).

    This is the console's one setup, made by whoever runs the program (the command line, or a
    Python caller who wants the log on the console); a stage that keeps a log file adds it with
    `log_to_file`. `level` defaults to INFO, or to WARNING in every torchrun process but the
    first, so that a multi-process run logs once.
    """
    from clipcap_cache.distributed import is_main_process

    if level is None:
        level = logging.INFO if is_main_process() else logging.WARNING
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console._clipcap_console = True
    console.setLevel(level)
    console.setFormatter(_formatter())
    logger.addHandler(console)
    if log_file is not None:
        log_to_file(log_file)
    return logger


def log_to_file(log_file: str | Path) -> None:
    """Also write the package's log to `log_file` (appended), replacing an earlier log file.

    The file gets debug records too, such as the output of third-party scorers
    (`third_party_output_to_log`), which the console leaves out. Without a console set up yet
    (a Python caller's first stage), `setup_logging` sets up the usual one. Records held by
    `held_for_log_file` are written to the file first.
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(getattr(h, "_clipcap_console", False) for h in logger.handlers):
        setup_logging()
    held: list[logging.LogRecord] = []
    for handler in list(logger.handlers):
        if getattr(handler, "_clipcap_log_file", False) or isinstance(handler, _Held):
            held += getattr(handler, "records", [])
            logger.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler._clipcap_log_file = True
    handler.setFormatter(_formatter())
    for record in held:
        handler.handle(record)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # the console handler keeps its own level


class _Held(logging.Handler):
    """Keeps the records logged before the log file exists, for `log_to_file` to write."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_for_log_file():
    """Hold the package's log records until `log_to_file` names the file they belong in.

    A stage that checks and loads everything before it creates its output folder (and the log
    file in it) still gets those steps' lines in the file. Records no file claimed are dropped
    at the end; the console has shown them anyway.
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(getattr(h, "_clipcap_console", False) for h in logger.handlers):
        setup_logging()
    handler = _Held()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S")


class _LineLogger(io.TextIOBase):
    """A text stream that logs each non-blank line it is given at debug level."""

    def __init__(self, logger: logging.Logger, prefix: str):
        self.logger, self.prefix, self.pending = logger, prefix, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.debug("%s: %s", self.prefix, line.rstrip())
        return len(text)


@contextlib.contextmanager
def third_party_output_to_log(prefix: str):
    """Log what a library prints, and what its subprocesses write, as debug lines.

    pycocoevalcap prints `{'testlen': ...}` and `ratio: ...`, and its Java tokenizer writes to
    the process's stderr. Both file descriptors are captured, not only `sys.stdout`, so the
    console keeps only our own output; the lines go to the log file.
    """
    stream = _LineLogger(logging.getLogger(PACKAGE_LOGGER), prefix)
    with tempfile.TemporaryFile() as capture:
        for handle in (sys.stdout, sys.stderr):
            handle.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            with contextlib.redirect_stdout(stream):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            capture.seek(0)
            stream.write(capture.read().decode("utf-8", errors="replace") + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines atomically."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON lines, skipping blank lines."""
    return read_json(path, "metrics file", lines=True)
