"""The core (extract, train, caption) imports and runs without the optional packages.

A GPU machine may lack the evaluation and serving packages, and the experiment trackers are
extras of their own. Each is blocked in a fresh
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
    "tensorboard",
    "wandb",
    "mlflow",
    "datasets",
    "pyarrow",
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
from clipcap_cache.training import trackers
for tool in ("tensorboard", "wandb", "mlflow"):
    try:
        trackers.check_available([tool])
    except ClipcapError as error:
        assert f'pip install "clipcap-cache[{{tool}}]"' in str(error), error
    else:
        raise AssertionError(f"--report-to {{tool}} without its package was not refused")
from clipcap_cache.data import hf_datasets
from clipcap_cache.extraction.features import FeatureConfig, extract_features
assert hf_datasets.layout_of("someone/shapes") == "hub"
assert hf_datasets.layout_of("data/train-{{0..3}}.parquet") == "parquet"
try:
    extract_features(FeatureConfig(annotations="someone/shapes", images=None, out="x.h5"))
except ClipcapError as error:
    assert 'pip install "clipcap-cache[datasets]"' in str(error), error
else:
    raise AssertionError("a hub dataset without the datasets package was not refused")
import clipcap_cache.retrieval
try:
    clipcap_cache.retrieval.Datastore.open("text.h5")
except ClipcapError as error:
    assert "retrieval needs the faiss-cpu package" in str(error), error
    assert "clipcap-cache[retrieval]" in str(error), error
else:
    raise AssertionError("a datastore without faiss was not refused")
from clipcap_cache import demo
said = []
assert demo._nearest_captions("features.h5", "datastore.h5", ["0"], said.append) is None
assert len(said) == 1 and "clipcap-cache[retrieval]" in said[0], said
# huggingface_hub cannot be blocked from the start (transformers imports it), so it is blocked
# once the core is loaded: what needs it says which extra installs it, in one line.
sys.modules["huggingface_hub"] = None
from clipcap_cache import checkpoint
from clipcap_cache.sharing.push import PushConfig, push
for needs_hub in (lambda: checkpoint.resolve("someone/model"), lambda: push(PushConfig("r", "a/b"))):
    try:
        needs_hub()
    except ClipcapError as error:
        assert 'needs the huggingface_hub package: pip install "clipcap-cache[hub]"' in str(error)
    else:
        raise AssertionError("a hub id without huggingface_hub was not refused")
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
