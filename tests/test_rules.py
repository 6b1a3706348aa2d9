"""The shared rules each stage calls: atomic writes, file-system errors, JSON reading, output
folders, the pad token, eval mode, autocast and the inference precision."""

import errno
import os
import types

import numpy as np
import pytest
import torch

from clipcap_cache import devices, files
from clipcap_cache.data.annotations import VAL
from clipcap_cache.data.cache import EmbeddingStream, open_cache, read_cache, write_cache
from clipcap_cache.errors import ClipcapError
from clipcap_cache.evaluation.cider import CiderD
from clipcap_cache.evaluation.clipscore import load_clip_text
from clipcap_cache.inference.captioner import Captioner
from clipcap_cache.inference.generate import DecodeConfig
from clipcap_cache.model import (
    ModelConfig,
    build_model,
    eval_mode,
    load_tokenizer,
    pad_token_id,
)
from clipcap_cache.training.config import TrainConfig
from clipcap_cache.training.validation import validate, validation_set

# Atomic writes -----------------------------------------------------------------------------------


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed midway")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    files.write_json_atomic(target, {"new": 1})
    assert files.read_json(target) == {"new": 1}
    assert list(tmp_path.iterdir()) == [target]


def test_an_atomic_write_reaches_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "metrics.jsonl"
    files.write_text_atomic(target, "{}\n")
    [(_, temporary, destination)] = [e for e in events if e[0] == "replace"]
    assert events == [
        ("fsync", temporary),  # the temporary file's data, before it takes the name
        ("replace", temporary, str(target)),
        ("fsync", str(tmp_path)),  # the folder's entry, so the rename survives a crash
    ]
    assert os.path.dirname(temporary) == str(tmp_path)  # beside the target: a rename, no copy


def test_a_cache_write_that_fails_midway_leaves_the_old_cache(tmp_path):
    path = tmp_path / "features.h5"

    def cache(rows, chunks):
        write_cache(
            path,
            embeddings=EmbeddingStream(rows, 4, np.dtype(np.float32), chunks),
            image_ids=[f"i{n}" for n in range(rows)],
            image_paths=[f"i{n}.png" for n in range(rows)],
            splits=["train"] * rows,
            captions=[f"caption {n}" for n in range(rows)],
            caption_image_index=np.arange(rows),
            failed_paths=[],
            failed_reasons=[],
            attrs={"clip_model": "tiny", "embedding_dim": 4},
        )

    cache(2, [np.ones((2, 4), np.float32)])
    with pytest.raises(ValueError, match="expected 3 embedding rows"):
        cache(3, [np.zeros((2, 4), np.float32)])  # the stream ends a row short
    assert read_cache(path).embeddings.tolist() == np.ones((2, 4)).tolist()
    assert list(tmp_path.iterdir()) == [path]


def test_fsync_flushes_files_and_folders(tmp_path):
    (tmp_path / "a").write_text("x")
    files.fsync(tmp_path / "a")
    files.fsync(tmp_path)
    with pytest.raises(FileNotFoundError):
        files.fsync(tmp_path / "missing")


# File-system errors, JSON and output folders ----------------------------------------------------


def test_os_errors_gives_one_line_with_the_reason(tmp_path):
    with (
        pytest.raises(ClipcapError) as caught,
        files.os_errors(f"cannot write {tmp_path}", "; hint"),
    ):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(caught.value) == f"cannot write {tmp_path}: No space left on device; hint"
    assert "\n" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    (tmp_path / "a-file").write_text("")
    with (
        pytest.raises(ClipcapError, match=r"^cannot create x: Not a directory$"),
        files.os_errors("cannot create x"),
    ):
        (tmp_path / "a-file" / "sub").mkdir()
    with pytest.raises(ValueError), files.os_errors("not an OSError: passes through"):
        raise ValueError


def test_read_json_reads_documents_and_json_lines_with_one_line_errors(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n\n{"epoch": 2}\n')
    assert files.read_json(path, lines=True) == [{"epoch": 1}, {"epoch": 2}]
    path.write_text('{"epoch": 1}\n{"epoch": \n')
    with pytest.raises(ClipcapError, match=r"metrics.jsonl: not valid JSON \(line 2, column"):
        files.read_json(path, lines=True)
    with pytest.raises(ClipcapError, match="^metrics file not found: "):
        files.read_json(tmp_path / "none.jsonl", "metrics file", lines=True)
    with pytest.raises(ClipcapError, match="is a directory, not a JSON file"):
        files.read_json(tmp_path)


def test_make_folder_refuses_a_file_and_creates_missing_parents(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("kept")
    with pytest.raises(ClipcapError, match=r"^--out .*file is a file; give a folder for the x$"):
        files.make_folder(a_file, "--out", "the x")
    assert a_file.read_text() == "kept"
    with pytest.raises(ClipcapError, match=r"^cannot create --out .*: Not a directory$"):
        files.make_folder(a_file / "below", "--out", "the x")
    files.make_folder(tmp_path / "a" / "b", "--out", "the x")
    assert (tmp_path / "a" / "b").is_dir()
    files.refuse_file(tmp_path / "a", "a folder is fine")
    with pytest.raises(ClipcapError, match="^a folder$"):
        files.refuse_folder(tmp_path / "a", "a folder")


# The model's rules ------------------------------------------------------------------------------


def test_pad_token_falls_back_to_eos(gpt2_dir):
    tokenizer = load_tokenizer(str(gpt2_dir))
    assert pad_token_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(types.SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0
    expected = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    assert pad_token_id(tokenizer) == expected


def test_eval_mode_restores_the_previous_mode_even_after_an_exception():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError), eval_mode(module):
        assert not module.training and not module[1].training
        raise RuntimeError("decoding failed")
    assert module.training and module[1].training
    module.eval()
    with eval_mode(module):
        pass
    assert not module.training  # a module in eval mode stays in eval mode


def test_autocast_runs_under_the_dtype_or_in_plain_fp32():
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 4)
    with devices.autocast(cpu, torch.bfloat16):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with devices.autocast(cpu, None):
        assert layer(torch.ones(1, 4)).dtype == torch.float32


# The inference precision ------------------------------------------------------------------------


def decode_dtypes(monkeypatch, model) -> list[torch.dtype]:
    """The autocast dtype in force at each of the model's `generate()` calls (fp32 without)."""
    seen = []
    real_generate = model.gpt2.generate

    def generate(*args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if on else torch.float32)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model.gpt2, "generate", generate)
    return seen


@pytest.mark.parametrize("inference", [None, torch.bfloat16], ids=["cpu-rule", "half-rule"])
def test_validation_and_evaluate_decode_in_the_inference_dtype(
    monkeypatch, tmp_path, shapes_cache, gpt2_dir, inference
):
    """Training in bf16, validation still decodes as evaluate's Captioner does: val_cider is
    evaluate's CIDEr-D on the same images and weights."""
    if inference is not None:  # as on a GPU: both follow the one rule wherever it points
        monkeypatch.setattr(devices, "inference_dtype", lambda device: inference)
    cpu = torch.device("cpu")
    expected = devices.inference_dtype(cpu)
    cache = open_cache(shapes_cache)
    torch.manual_seed(0)
    model_config = ModelConfig(
        gpt2_model=str(gpt2_dir), clip_embedding_dim=cache.embedding_dim, prefix_length=4
    )
    model = build_model(model_config).train()
    tokenizer = load_tokenizer(str(gpt2_dir))
    config = TrainConfig(features=str(shapes_cache), out=str(tmp_path), eval_images=6)
    validation = validation_set(cache, cache.rows_of_split(VAL), tokenizer, config)
    seen = decode_dtypes(monkeypatch, model)

    row = validate(model, tokenizer, validation, None, torch.bfloat16, 4, pad_token_id(tokenizer))
    in_validation, seen[:] = list(seen), []
    found = Captioner(model, tokenizer, {}).caption_embeddings(
        validation.embeddings, DecodeConfig(strategy="greedy"), batch_size=4
    )
    assert in_validation == seen == [expected, expected]
    captions = [image[0]["caption"] for image in found]
    cider = CiderD(validation.references).score(captions, validation.references)
    assert row["val_cider"] == pytest.approx(float(cider.mean()), abs=1e-12)
    assert model.training  # validation gave the model back in training mode


def test_the_clip_text_tower_loads_in_the_inference_dtype(monkeypatch, clip_dir):
    assert load_clip_text(str(clip_dir)).model.dtype == devices.inference_dtype(torch.device("cpu"))
    monkeypatch.setattr(devices, "inference_dtype", lambda device: torch.bfloat16)
    assert load_clip_text(str(clip_dir)).model.dtype == torch.bfloat16
