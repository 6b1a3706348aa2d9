"""Logging to the console and a run's log file, and the per-epoch metrics file.

One formatter serves both handlers. Metrics go to `metrics.jsonl`, one JSON object per epoch,
rewritten atomically from the run's history so a resumed run never holds stale rows.
"""

import json
import logging
import sys
from pathlib import Path

from clipcap_cache.files import write_text_atomic

FORMAT = "%(asctime)s %(levelname)s %(message)s"
PACKAGE_LOGGER = "clipcap_cache"


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send the package's log records to stderr and, if given, to `log_file` (appended)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines atomically."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON lines, skipping blank lines."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
