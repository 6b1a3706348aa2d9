"""Sharing a model: `clipcap export`, `clipcap push`, and loading a checkpoint by its hub id.

The hub is never reached. Loading by id goes through the real `huggingface_hub.snapshot_download`
with HF_HUB_OFFLINE=1 (set by conftest), from a hub cache that the tests lay out in the hub's
documented layout (`models--USER--NAME/refs/main`, `snapshots/REV/...`). `push` runs for real up
to the upload: huggingface_hub's `HfApi` upload calls are replaced by recorders, so what would
be uploaded, and with which settings, is checked, and nothing is sent.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from conftest import REPO, assert_one_line_error, extract_shapes, run_cli

from clipcap_cache import Captioner, checkpoint
from clipcap_cache.model import count_parameters

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_layout(cache: Path, repo_id: str, folder: Path) -> Path:
    """Put `folder` in the hub cache `cache` as the main revision of model `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    return snapshot


def greedy(captioner, images) -> list[list[dict]]:
    return captioner(images, greedy=True, max_tokens=12)


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def images(shapes):
    _, root = shapes
    return sorted((root / "images").iterdir())[-6:]  # test-split images


@pytest.fixture(scope="module")
def run_captions(captioner, images):
    """The trained run's own greedy captions: what every export must reproduce."""
    return greedy(captioner, images)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, trained_run, shapes_cache):
    """A copy of the trained run, evaluated on its test split (so that the card has scores)."""
    run = tmp_path_factory.mktemp("shared") / "shapes-run"
    shutil.copytree(trained_run, run)
    run_cli(
        "evaluate", run, "--features", shapes_cache, "--split", "test", "--greedy",
        "--max-tokens", "12", "--no-bertscore", "--device", "cpu", check=0,
    )  # fmt: skip
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_run):
    """A self-contained export of the run, then moved to another folder."""
    first = tmp_path_factory.mktemp("export") / "shapes-captioner"
    run_cli(
        "export", shared_run, first, "--self-contained", "--repo", "me/shapes",
        "--dataset", "me/shapes-data", check=0,
    )  # fmt: skip
    moved = tmp_path_factory.mktemp("elsewhere") / "moved"
    shutil.move(first, moved)
    return moved


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub (and transformers through it) reads in-process."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder named like the hub ids
    return cache


# ------------------------------------------------------------------ export


def test_an_exported_folder_moved_anywhere_captions_like_its_run(
    exported, run_captions, images, trained_run, clip_dir, gpt2_dir
):
    config = json.loads((exported / "config.json").read_text())
    assert config["clip_model"] == "./base/clip"
    assert config["model"]["gpt2_model"] == "./base/gpt2"
    assert sorted(p.name for p in (exported / "base").iterdir()) == ["clip", "gpt2"]
    assert not (exported / "train_state.pt").exists()
    for name in ("config.json", "README.md"):  # no path of the training machine is shared
        text = (exported / name).read_text()
        for local in (clip_dir, gpt2_dir, trained_run.parent):
            assert str(local) not in text, (name, local)
    captioner = Captioner.from_checkpoint(exported, device="cpu")
    assert greedy(captioner, images) == run_captions
    assert captioner.config["clip_model"] == str(exported / "base" / "clip")


def test_the_model_card_says_what_the_model_is_and_how_it_scores(exported, shared_run, captioner):
    card = (exported / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "clipcap-cache"
    assert meta["pipeline_tag"] == "image-to-text"
    assert "image-captioning" in meta["tags"]
    assert (meta["license"], meta["datasets"]) == ("mit", ["me/shapes-data"])
    assert "base_model" not in meta  # both base models are copies inside the folder
    trainable, _ = count_parameters(captioner.model)
    assert f"| trainable parameters | {trainable:,} (" in card
    assert "| prefix length | 4 |" in card
    assert "| frozen GPT-2 blocks | the first 0 " in card
    assert "| `epochs` | 30 |" in card and "| `lr` | 0.003 |" in card
    assert "shapes.h5" in card  # the cache it was trained on
    result = json.loads((shared_run / "eval-test" / "metrics.json").read_text())
    assert result["decode"]["strategy"] == "greedy"
    header = next(line for line in card.splitlines() if line.startswith("| split |"))
    row = next(line for line in card.splitlines() if line.startswith("| test |"))
    cells = dict(zip(table_cells(header), table_cells(row), strict=True))
    assert cells["images"] == str(result["images"]) == "24"
    assert cells["decoding"] == "greedy, at most 12 tokens"
    assert result["metrics"]
    for metric, value in result["metrics"].items():
        assert cells[metric] == f"{value:.4g}", metric
    assert 'pip install "clipcap-cache[hub]"' in card
    assert "clipcap caption photo.jpg --checkpoint me/shapes" in card
    assert 'Captioner.from_checkpoint("me/shapes")' in card


def test_an_evaluation_of_an_earlier_save_is_left_out_of_the_card(shared_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shared_run, run)
    results = run / "eval-test" / "metrics.json"
    result = json.loads(results.read_text())
    result["checkpoint_step"] -= 1
    results.write_text(json.dumps(result))
    run_cli("export", run, tmp_path / "out", "--self-contained", check=0)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| test |" not in card and "No `clipcap evaluate` results" in card


def test_overwrite_replaces_the_folder_whole(shared_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    run_cli("export", shared_run, out, "--self-contained", "--overwrite", check=0)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


# ------------------------------------------------------------------ load by hub id


@pytest.mark.slow
def test_an_export_by_hub_names_loads_by_id_from_the_hub_cache_offline(
    shared_run, tmp_path, clip_dir, gpt2_dir, run_captions, images
):
    """The whole user path in a fresh process: the env variables, the CLI, the base models too."""
    out = tmp_path / "export"
    run_cli(
        "export", shared_run, out, "--base-clip", "tiny/clip", "--base-gpt2", "tiny/gpt2",
        check=0,
    )  # fmt: skip
    assert front_matter((out / "README.md").read_text())["base_model"] == [
        "tiny/clip",
        "tiny/gpt2",
    ]
    cache = tmp_path / "hub"
    hub_layout(cache, "me/shapes", out)
    hub_layout(cache, "tiny/clip", clip_dir)
    hub_layout(cache, "tiny/gpt2", gpt2_dir)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "caption", *map(str, images), "--checkpoint",
         "me/shapes", "--greedy", "--max-tokens", "12", "--format", "json", "--device", "cpu"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    captions = [r["captions"] for r in json.loads(result.stdout)]
    assert captions == [[c["caption"] for c in image] for image in run_captions]


@pytest.mark.slow
def test_caption_evaluate_serve_and_train_init_take_a_hub_id(
    exported, hub_cache, shapes, run_captions, images, shared_run, monkeypatch
):
    snapshot = hub_layout(hub_cache, "me/shapes-sc", exported)
    assert checkpoint.resolve("me/shapes-sc") == snapshot
    captioner = Captioner.from_checkpoint("me/shapes-sc", device="cpu")
    assert greedy(captioner, images) == run_captions

    # serve: the app that `clipcap serve` would run, captured instead of run.
    import uvicorn
    from fastapi.testclient import TestClient

    from clipcap_cache.inference import serve as serve_module

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **settings: apps.append(app))
    # Not in the test process: it would change the C allocator of every later test.
    monkeypatch.setattr(serve_module, "keep_large_buffers_out_of_the_heap", lambda: False)
    with socket.socket() as probe:  # a port no one else on the machine is using
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_cli("serve", "--checkpoint", "me/shapes-sc", "--port", port, "--device", "cpu", check=0)
    upload = [("images", (images[0].name, images[0].read_bytes(), "image/png"))]
    with TestClient(apps[0], base_url="http://127.0.0.1") as client:
        reply = client.post("/caption", files=upload, data={"greedy": "true", "max_tokens": "12"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["results"][0]["captions"][0]["caption"] == run_captions[0][0]["caption"]

    # evaluate and train --init need a cache of the checkpoint's CLIP model: its copy in the
    # snapshot, which the checkpoint names.
    annotations, root = shapes
    features = extract_shapes(annotations, root, hub_cache.parent / "c.h5", snapshot / "base/clip")
    run_cli(
        "evaluate", "me/shapes-sc", "--features", features, "--split", "test", "--greedy",
        "--max-tokens", "12", "--no-bertscore", "--device", "cpu", check=0,
    )  # fmt: skip
    out = hub_cache.parent / "me--shapes-sc-eval-test"  # in the working directory, not the cache
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions == json.loads((shared_run / "eval-test" / "predictions.json").read_text())

    run = hub_cache.parent / "run"
    row = json.loads(
        run_cli(
            "train", features, "--out", run, "--init", "me/shapes-sc", "--epochs", "1",
            "--batch-size", "32", "--lr", "1e-5", "--warmup-steps", "1", "--no-bertscore",
            "--eval-images", "0", "--save-every-steps", "0", "--device", "cpu", "--seed", "0",
            check=0,
        ).stdout.strip().splitlines()[-1]
    )  # fmt: skip
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["init"] == "me/shapes-sc"
    trained_loss = checkpoint.read_config(snapshot)["metrics"]["val_loss"]
    # Started from the shared weights: one more epoch at a small rate stays at their loss, far
    # below a fresh model's (about ln 50257 = 10.8 for random GPT-2 logits over the vocabulary).
    assert abs(row["val_loss"] - trained_loss) < 0.05


def test_a_local_folder_wins_over_the_hub_id_of_its_name(exported, hub_cache):
    hub_layout(hub_cache, "me/shapes-sc", exported)
    local = hub_cache.parent / "me" / "shapes-sc"
    shutil.copytree(exported, local)
    assert checkpoint.resolve("me/shapes-sc") == Path("me/shapes-sc")
    assert checkpoint.resolve("me/shapes-sc").resolve() == local.resolve()


# ------------------------------------------------------------------ push, as far as the hub


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub online and logged in, with its upload calls recorded instead of sent."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken0123456789")
    calls = {}

    def create_repo(self, repo_id, **settings):
        calls["create_repo"] = (repo_id, settings)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **settings):
        calls["create_branch"] = (repo_id, settings)

    def upload_folder(self, **settings):
        calls["upload_folder"] = settings
        calls["token"] = self.token
        shutil.copytree(settings["folder_path"], tmp_path / "uploaded")
        calls["uploaded_from"] = Path(settings["folder_path"])

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_export_with_its_settings(fake_hub, shared_run, tmp_path):
    result = run_cli(
        "push", shared_run, "--repo", "me/shapes", "--private", "--revision", "v1",
        "--self-contained", check=0,
    )  # fmt: skip
    assert "https://huggingface.co/me/shapes" in result.stdout
    assert fake_hub["create_repo"] == (
        "me/shapes",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    assert fake_hub["create_branch"][1]["branch"] == "v1"
    assert fake_hub["upload_folder"]["repo_id"] == "me/shapes"
    assert fake_hub["upload_folder"]["revision"] == "v1"
    assert fake_hub["token"] == os.environ["HF_TOKEN"]  # huggingface_hub's own login
    assert not fake_hub["uploaded_from"].exists()  # the temporary export is gone
    # What was uploaded is what `clipcap export` writes, card and all.
    run_cli("export", shared_run, tmp_path / "export", "--self-contained", "--repo", "me/shapes")
    uploaded, exported = tmp_path / "uploaded", tmp_path / "export"
    files = sorted(str(p.relative_to(uploaded)) for p in uploaded.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert "README.md" in files and "base/gpt2/model.safetensors" in files
    for name in files:
        if name != "README.md":  # the card names the folder: the upload's is "shapes"
            assert (uploaded / name).read_bytes() == (exported / name).read_bytes(), name
    assert "# shapes\n" in (uploaded / "README.md").read_text()
    assert os.environ["HF_TOKEN"] not in result.stdout + result.stderr


@pytest.mark.bad_input("message")
def test_a_failed_upload_is_one_line_without_the_token(fake_hub, shared_run, monkeypatch):
    token = os.environ["HF_TOKEN"]

    def refuse(self, repo_id, **settings):
        # A real response of the HTTP library that huggingface_hub itself uses.
        response_type = huggingface_hub.errors.HfHubHTTPError.__init__.__annotations__["response"]
        http = sys.modules[response_type.__module__.split(".")[0]]
        request = http.Request("POST", "https://huggingface.co/api/repos/create")
        response = response_type(401, request=request)
        raise huggingface_hub.errors.HfHubHTTPError(
            f"401 Unauthorized for token {token}", response=response
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    result = run_cli("push", shared_run, "--repo", "me/shapes", "--self-contained")
    error = assert_one_line_error(result)
    assert "cannot push to me/shapes: 401 Unauthorized" in error
    assert token not in result.stdout + result.stderr


@pytest.mark.bad_input("message")
def test_push_offline_is_one_line(shared_run):
    assert huggingface_hub.constants.is_offline_mode()  # conftest switched the hub off
    error = assert_one_line_error(run_cli("push", shared_run, "--repo", "me/shapes"))
    assert "HF_HUB_OFFLINE" in error


@pytest.mark.bad_input("message")
def test_push_without_a_login_is_one_line(fake_hub, shared_run, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    error = assert_one_line_error(run_cli("push", shared_run, "--repo", "me/shapes"))
    assert "hf auth login" in error
    assert "create_repo" not in fake_hub


@pytest.mark.bad_input("bad option")
@pytest.mark.parametrize("repo", ["shapes", "me/shapes/v1", "-me/shapes", "me/sha--pes", "me/"])
def test_push_refuses_a_bad_repo_id(shared_run, repo):
    error = assert_one_line_error(run_cli("push", shared_run, "--repo", repo))
    assert "is not a hub repository id" in error


# ------------------------------------------------------------------ bad input to export


@pytest.mark.bad_input("message")
def test_export_refuses_local_base_models_and_names_the_ways_out(shared_run, tmp_path):
    out = tmp_path / "out"
    error = assert_one_line_error(run_cli("export", shared_run, out))
    assert "local directories" in error
    assert "--self-contained" in error and "--base-clip NAME" in error
    assert "--base-gpt2 NAME" in error
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.bad_input("message")
def test_export_names_only_the_base_model_still_local(shared_run, tmp_path):
    error = assert_one_line_error(
        run_cli("export", shared_run, tmp_path / "out", "--base-clip", "tiny/clip")
    )
    assert "--base-gpt2 NAME" in error and "--base-clip" not in error


@pytest.mark.bad_input("data loss")
def test_export_refuses_a_folder_that_holds_files(shared_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    error = assert_one_line_error(run_cli("export", shared_run, out, "--self-contained"))
    assert "is not empty: pass --overwrite" in error
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.bad_input("data loss")
@pytest.mark.parametrize("where", ["the run", "inside the checkpoint"])
def test_export_refuses_to_overwrite_its_own_checkpoint(shared_run, tmp_path, where):
    run = tmp_path / "run"
    shutil.copytree(shared_run, run)
    out = run if where == "the run" else run / "checkpoints" / "best" / "export"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    error = assert_one_line_error(run_cli("export", run, out, "--self-contained", "--overwrite"))
    assert "export to a folder of its own" in error
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.bad_input("message")
def test_export_of_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    error = assert_one_line_error(run_cli("export", tmp_path / "empty", tmp_path / "out"))
    assert "is not a checkpoint folder or a run directory" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input("message")
def test_a_hub_id_missing_from_the_cache_is_one_line_offline(hub_cache, images):
    error = assert_one_line_error(
        run_cli("caption", images[0], "--checkpoint", "me/not-there", "--device", "cpu")
    )
    assert "checkpoint not found: me/not-there" in error
    assert "HF_HUB_OFFLINE is set" in error


@pytest.mark.bad_input("message")
def test_a_hub_repository_that_is_no_checkpoint_is_one_line(hub_cache, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    hub_layout(hub_cache, "me/other", tmp_path / "other")
    error = assert_one_line_error(run_cli("export", "me/other", tmp_path / "out"))
    assert "the hub repository me/other is not a clipcap checkpoint" in error


@pytest.mark.bad_input("bad option")
@pytest.mark.parametrize(
    "args, message",
    [
        (["--base-clip", "not a name"], "--base-clip 'not a name' is not a hub model name"),
        (["--dataset", "a/b/c"], "--dataset 'a/b/c' is not a hub dataset id"),
        (["--license", "MIT License"], "--license 'MIT License' is not a license id"),
        (["--repo", "shapes"], "--repo 'shapes' is not a hub repository id"),
    ],
)
def test_export_refuses_bad_names(shared_run, tmp_path, args, message):
    error = assert_one_line_error(run_cli("export", shared_run, tmp_path / "out", *args))
    assert message in error


@pytest.mark.bad_input("silent wrong result")
def test_base_clip_cannot_rename_a_hub_base_model(shared_run, tmp_path):
    named = tmp_path / "named"
    run_cli("export", shared_run, named, "--base-clip", "tiny/clip", "--base-gpt2", "tiny/gpt2")
    error = assert_one_line_error(
        run_cli("export", named, tmp_path / "again", "--base-clip", "other/clip")
    )
    assert "is the hub model tiny/clip, not a local directory" in error


@pytest.mark.bad_input("data loss")
def test_a_folder_filled_while_the_export_is_built_is_not_replaced(shared_run, tmp_path):
    from clipcap_cache.errors import ClipcapError
    from clipcap_cache.sharing.export import ExportConfig, plan_export, write_export

    out = tmp_path / "out"
    plan = plan_export(ExportConfig(str(shared_run), str(out), self_contained=True))
    out.mkdir()
    (out / "notes.txt").write_text("keep me")  # another process, since the check
    with pytest.raises(ClipcapError, match="is not empty: pass --overwrite"):
        write_export(plan)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
