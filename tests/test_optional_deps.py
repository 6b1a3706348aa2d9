"""The core (extract, train, caption) imports and runs without the optional packages.

A GPU machine may lack the evaluation and serving packages. Each is blocked in a fresh
interpreter (`sys.modules[name] = None` makes its import fail), and the core modules are imported
and called there.
"""

import subprocess
import sys

from conftest import REPO

OPTIONAL = (
    "bert_score",
    "pycocoevalcap",
    "braceexpand",
    "fastapi",
    "uvicorn",
    "multipart",
    "faiss",
)

PROGRAM = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
import cli
import clipcap_cache.extraction.features
import clipcap_cache.training.train
import clipcap_cache.inference.caption
import clipcap_cache.inference.captioner
import clipcap_cache.inference.generate
from clipcap_cache.data import webdataset
from clipcap_cache.errors import ClipcapError
assert not webdataset.is_webdataset("captions.json")
assert webdataset.is_webdataset("shards/a.tar")
try:
    webdataset.shard_paths("shards/{{0..9}}.tar")
except ClipcapError as error:
    assert "needs the braceexpand package" in str(error), error
else:
    raise AssertionError("a brace pattern without braceexpand was not refused")
import clipcap_cache.retrieval
try:
    clipcap_cache.retrieval.Datastore.open("text.h5")
except ClipcapError as error:
    assert "retrieval needs the faiss-cpu package" in str(error), error
    assert "clipcap-cache[retrieval]" in str(error), error
else:
    raise AssertionError("a datastore without faiss was not refused")
loaded = sorted(name for name in {OPTIONAL!r} if sys.modules.get(name) is not None)
assert not loaded, loaded
print("ok")
"""


def test_the_core_imports_without_the_optional_packages():
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
