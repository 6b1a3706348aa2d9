"""The CLIP weights' fingerprint: recorded by every file of embeddings, checked wherever CLIP loads.

A cache, a text file and a checkpoint name their CLIP model by hub name or folder. These tests put
another tiny CLIP of the same shape (another seed) in that folder and check that every stage that
would mix the two models' embeddings refuses with one line, writing nothing; files that record no
fingerprint (written by earlier versions) are still read, unchecked.
"""

import json
import shutil
from types import SimpleNamespace

import h5py
import pytest
from conftest import assert_one_line_error, extract_shapes, run_cli
from test_serve import free_port
from test_train import train_args

from clipcap_cache.data.cache import read_attrs, read_cache
from clipcap_cache.demo import build_tiny_clip, make_shapes_dataset
from clipcap_cache.extraction import features
from clipcap_cache.extraction import text as text_embedding
from clipcap_cache.fingerprints import pretrained_fingerprint

SWAPPED = "comes from other CLIP weights than"


def swap(clip):
    """Replace the CLIP folder by a model of the same shape with other weights."""
    shutil.rmtree(clip)
    build_tiny_clip(clip, seed=1)


def set_attr(path, key, value):
    with h5py.File(path, "r+") as f:
        if value is None:
            del f.attrs[key]
        else:
            f.attrs[key] = value


@pytest.fixture(scope="module")
def swapped(tmp_path_factory, clip_dir, checkpoint_run, shapes_cache):
    """A checkpoint, a cache and a text file of one CLIP folder, and the same after the swap.

    The checkpoint and `cache` (copies of the session's, renamed to the folder) were made with the
    first model; `after` (a cache) and `text_after` (a text file) with the second, under the same
    name. The folder holds the second model when the tests run.
    """
    root = tmp_path_factory.mktemp("clipfp")
    clip = root / "clip"
    shutil.copytree(clip_dir, clip)
    ckpt = root / "ckpt"
    shutil.copytree(checkpoint_run / "checkpoints" / "best", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["clip_model"] = str(clip)
    (ckpt / "config.json").write_text(json.dumps(config))
    cache = root / "cache.h5"
    shutil.copy(shapes_cache, cache)
    set_attr(cache, "clip_model", str(clip))
    data = root / "data"
    annotations = make_shapes_dataset(data, {"train": 8, "val": 4, "test": 4}, seed=3)
    first = pretrained_fingerprint(str(clip))
    assert config["clip_fingerprint"] == first == read_attrs(cache)["clip_fingerprint"]

    swap(clip)
    after = extract_shapes(annotations, data, root / "after.h5", clip)
    text_after = root / "text_after.h5"
    run_cli(
        "embed-text", annotations, "--out", text_after, "--clip-model", clip, "--device", "cpu",
        check=0,
    )  # fmt: skip
    second = pretrained_fingerprint(str(clip))
    assert second != first
    assert read_attrs(after)["clip_fingerprint"] == read_attrs(text_after)["clip_fingerprint"]
    assert read_attrs(after)["clip_fingerprint"] == second
    image = next((data / "images").glob("*.png"))
    return SimpleNamespace(
        root=root, clip=clip, ckpt=ckpt, cache=cache, after=after, text_after=text_after,
        annotations=annotations, data=data, image=image, first=first, second=second,
    )  # fmt: skip


def refused(result, s) -> str:
    line = assert_one_line_error(result)
    assert SWAPPED in line and s.first in line and s.second in line, line
    return line


@pytest.mark.bad_input("silent wrong result")
def test_caption_refuses_a_swapped_clip_folder_and_writes_nothing(swapped):
    out = swapped.root / "captions.json"
    result = run_cli(
        "caption", swapped.image, "--checkpoint", swapped.ckpt, "--device", "cpu", "--out", out
    )
    line = refused(result, swapped)
    assert f"CLIP model {swapped.clip} comes from other CLIP weights than the checkpoint" in line
    assert "put the original model back" in line
    assert not out.exists()


@pytest.mark.bad_input("silent wrong result")
def test_serve_refuses_a_swapped_clip_folder(swapped):
    port = str(free_port())
    refused(
        run_cli("serve", "--checkpoint", swapped.ckpt, "--port", port, "--device", "cpu"), swapped
    )


@pytest.mark.bad_input("silent wrong result")
def test_evaluate_refuses_features_of_the_swapped_model(swapped):
    out = swapped.root / "eval"
    result = run_cli(
        "evaluate", swapped.ckpt, "--features", swapped.after, "--split", "test",
        "--device", "cpu", "--no-bertscore", "--out", out,
    )  # fmt: skip
    assert f"{swapped.after} comes from other CLIP weights than the checkpoint" in refused(
        result, swapped
    )
    assert not out.exists()


@pytest.mark.bad_input("silent wrong result")
@pytest.mark.parametrize("command", ["evaluate", "score"])
def test_clipscore_refuses_a_text_tower_of_the_swapped_model(swapped, shapes, command, tmp_path):
    out = tmp_path / "out"
    if command == "evaluate":
        args = [swapped.ckpt, "--features", swapped.cache, "--split", "test"]
    else:
        predictions = tmp_path / "p.json"
        ids = read_cache(swapped.cache).image_ids
        predictions.write_text(
            json.dumps([{"image_id": int(i), "caption": "a circle"} for i in ids])
        )
        args = [predictions, "--references", shapes[0], "--features", swapped.cache]
    result = run_cli(
        command, *args, "--clipscore", "--no-bertscore", "--device", "cpu", "--out", out
    )
    assert f"than the cache {swapped.cache}" in refused(result, swapped)
    assert not out.exists()


@pytest.mark.bad_input("silent wrong result")
def test_embed_text_refuses_a_cache_of_the_model_before_the_swap(swapped, tmp_path):
    out = tmp_path / "text.h5"
    result = run_cli("embed-text", swapped.cache, "--out", out, "--device", "cpu")
    assert f"than the cache {swapped.cache}" in refused(result, swapped)
    assert not out.exists() and not out.with_name("text.h5.parts").exists()


@pytest.mark.bad_input("silent wrong result")
@pytest.mark.parametrize("door", ["datastore", "val-features", "init"])
def test_training_refuses_embeddings_of_the_swapped_model(swapped, gpt2_dir, door, tmp_path):
    out = tmp_path / "run"
    extra = {
        "datastore": ["--retrieval", "2", "--datastore", swapped.text_after],
        "val-features": ["--val-features", swapped.after],
        "init": ["--init", swapped.ckpt],
    }[door]
    # The datastore and validation cache are checked against the training cache, --init's
    # checkpoint against the training cache: one of each pair is of the other model.
    features_ = swapped.after if door == "init" else swapped.cache
    refused(run_cli(*train_args(features_, out, gpt2_dir, *extra)), swapped)
    assert not out.exists()


def _progress_then_swap(tmp_path, clip_dir, make, gather_module):
    """Progress of a run of `make` (a shard of it removed, as a crash leaves it), then a swap."""
    clip = tmp_path / "clip"
    shutil.copytree(clip_dir, clip)
    original = gather_module._gather

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    gather_module._gather = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            make(clip)
    finally:
        gather_module._gather = original
    parts = next(tmp_path.glob("*.parts"))
    shards = sorted(parts.glob("shard-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    first = pretrained_fingerprint(str(clip))
    swap(clip)
    return clip, parts, before, first


@pytest.mark.bad_input("silent wrong result")
def test_a_resumed_extraction_refuses_the_swapped_model(tmp_path, clip_dir, shapes):
    annotations, root = shapes
    out = tmp_path / "f.h5"

    def make(clip):
        features.extract_features(
            features.FeatureConfig(
                annotations=str(annotations),
                images=str(root),
                out=str(out),
                clip_model=str(clip),
                num_workers=0,
                shard_size=64,
                device="cpu",
                limit=128,
            )  # fmt: skip
        )

    clip, parts, before, first = _progress_then_swap(tmp_path, clip_dir, make, features)
    result = run_cli(
        "extract-features", annotations, "--images", root, "--out", out, "--clip-model", clip,
        "--shard-size", "64", "--limit", "128", "--num-workers", "0", "--device", "cpu",
    )  # fmt: skip
    line = assert_one_line_error(result)
    assert f"than the progress in {parts}" in line and first in line
    assert pretrained_fingerprint(str(clip)) in line
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before


@pytest.mark.bad_input("silent wrong result")
def test_a_resumed_embed_text_refuses_the_swapped_model(tmp_path, clip_dir, shapes):
    annotations, _ = shapes
    out = tmp_path / "t.h5"

    def make(clip):
        text_embedding.embed_text(
            text_embedding.TextConfig(
                source=str(annotations),
                out=str(out),
                clip_model=str(clip),
                shard_size=200,
                device="cpu",
            )  # fmt: skip
        )

    clip, parts, before, first = _progress_then_swap(tmp_path, clip_dir, make, text_embedding)
    result = run_cli(
        "embed-text", annotations, "--out", out, "--clip-model", clip, "--shard-size", "200",
        "--device", "cpu",
    )  # fmt: skip
    line = assert_one_line_error(result)
    assert f"than the progress in {parts}" in line and first in line
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before


def test_files_without_a_fingerprint_are_read_unchecked(swapped, tmp_path):
    # A checkpoint and a cache from before fingerprints: the swapped folder is not noticed.
    ckpt = tmp_path / "old"
    shutil.copytree(swapped.ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    del config["clip_fingerprint"]
    (ckpt / "config.json").write_text(json.dumps(config))
    run_cli("caption", swapped.image, "--checkpoint", ckpt, "--device", "cpu", check=0)
    cache = tmp_path / "old.h5"
    shutil.copy(swapped.cache, cache)
    set_attr(cache, "clip_fingerprint", None)
    out = tmp_path / "text.h5"
    run_cli("embed-text", cache, "--out", out, "--device", "cpu", check=0)
    # What is written now records the model it was made with.
    assert read_attrs(out)["clip_fingerprint"] == swapped.second


def test_the_fingerprint_is_of_the_weights_whatever_file_holds_them(tmp_path, clip_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from clipcap_cache.fingerprints import weights_fingerprint

    tensors = load_file(str(clip_dir / "model.safetensors"))
    for name, options in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
        (tmp_path / name).mkdir()
        torch.save(tensors, tmp_path / name / "pytorch_model.bin", **options)
    found = {pretrained_fingerprint(str(tmp_path / name)) for name in ("zip", "legacy")}
    loaded = CLIPModel.from_pretrained(clip_dir).state_dict().items()
    assert found == {pretrained_fingerprint(str(clip_dir)), weights_fingerprint(loaded)}
    other = build_tiny_clip(tmp_path / "other", seed=1)
    assert pretrained_fingerprint(str(other)) != pretrained_fingerprint(str(clip_dir))
    assert pretrained_fingerprint(str(tmp_path / "no-such-folder")) is None


def test_a_tensor_of_gpt2s_size_is_fingerprinted():
    import torch

    from clipcap_cache.fingerprints import weights_fingerprint

    # GPT-2's token table: in float32 its last sampled position rounded up past its end.
    table = torch.zeros(50257 * 768, dtype=torch.float16)
    table[-1] = 1
    assert weights_fingerprint([("wte", table)]) != weights_fingerprint([("wte", table * 0)])


@pytest.mark.bad_input("silent wrong result")
def test_one_set_of_weights_in_another_precision_or_with_integer_buffers_is_the_same(
    tmp_path, clip_dir
):
    # A float16 copy of the weights, or a file that also holds `position_ids` (older saves do),
    # is the same model: refusing it would refuse a user's own copy of the hub's CLIP.
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(clip_dir / "model.safetensors"))
    (tmp_path / "half").mkdir()
    save_file({k: v.half() for k, v in tensors.items()}, tmp_path / "half" / "model.safetensors")
    (tmp_path / "buffers").mkdir()
    extra = {"text_model.embeddings.position_ids": torch.arange(16)[None]}
    save_file({**tensors, **extra}, tmp_path / "buffers" / "model.safetensors")
    expected = pretrained_fingerprint(str(clip_dir))
    assert pretrained_fingerprint(str(tmp_path / "half")) == expected
    assert pretrained_fingerprint(str(tmp_path / "buffers")) == expected
    # One value changed beyond float16's rounding is another model.
    changed = dict(tensors)
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    changed[name] = tensors[name].clone().reshape(-1)
    changed[name][0] += 1.0
    changed[name] = changed[name].reshape(tensors[name].shape)
    (tmp_path / "changed").mkdir()
    save_file(changed, tmp_path / "changed" / "model.safetensors")
    assert pretrained_fingerprint(str(tmp_path / "changed")) != expected


@pytest.mark.bad_input("traceback")
@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"model.safetensors.index.json": "{not json"}, "cannot read the weights"),
        ({"model.safetensors.index.json": '{"other": 1}'}, "cannot read the weights"),
        ({"model.safetensors": b"\xff" * 8 + b"{}"}, "cannot read the weights"),
        ({"pytorch_model.bin": b"not a zip nor a pickle"}, "cannot read the weights"),
    ],
)
def test_damaged_weight_files_are_one_line(tmp_path, files, message):
    from clipcap_cache.errors import ClipcapError

    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(ClipcapError, match=message):
        pretrained_fingerprint(str(tmp_path))


@pytest.mark.bad_input("silent wrong result")
def test_a_checkpoint_recording_the_first_gpt2_fingerprint_scheme_is_still_checked(gpt2_dir):
    # Checkpoints saved before the present scheme recorded the legacy hash of the same weights:
    # accepted for the GPT-2 they were trained on, refused for another.
    from clipcap_cache.checkpoint import check_base
    from clipcap_cache.errors import ClipcapError
    from clipcap_cache.fingerprints import legacy_fingerprint
    from clipcap_cache.model import ModelConfig, build_model

    model = build_model(ModelConfig(gpt2_model=str(gpt2_dir), prefix_length=2))
    legacy = legacy_fingerprint(model.gpt2.named_parameters())
    assert legacy != model.base_fingerprint
    check_base(model, {"gpt2_fingerprint": legacy}, "the old run")
    check_base(model, {"gpt2_fingerprint": model.base_fingerprint}, "a new run")
    with pytest.raises(ClipcapError, match="is not the one the old run was trained on"):
        check_base(model, {"gpt2_fingerprint": "0" * 16}, "the old run")


@pytest.mark.bad_input("silent wrong result")
def test_a_text_tower_is_checked_again_once_loaded(tmp_path, clip_dir):
    # A hub model not yet in the local cache has no files to fingerprint before it loads:
    # CLIPScore and the CLIP-S reward compare the tower as loaded with the cache's record.
    from clipcap_cache.errors import ClipcapError
    from clipcap_cache.evaluation.clipscore import check_loaded_clip, load_clip_text

    attrs = {
        "clip_model": str(clip_dir),
        "embedding_dim": load_clip_text(clip_dir).model.config.projection_dim,
        "clip_fingerprint": pretrained_fingerprint(str(clip_dir)),
    }
    check_loaded_clip(attrs, "c.h5", load_clip_text(clip_dir))
    other = build_tiny_clip(tmp_path / "other", seed=1)
    with pytest.raises(ClipcapError, match=SWAPPED):
        check_loaded_clip(attrs, "c.h5", load_clip_text(other))
