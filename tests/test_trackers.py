"""`train --report-to`: TensorBoard, W&B and MLflow records, read back through the tools' own readers.

Everything runs offline: TensorBoard event files are read with TensorBoard's EventAccumulator
(which applies a resume's purge, as the TensorBoard UI does) and tbparse; W&B runs in
`WANDB_MODE=offline` and its `.wandb` transaction log is decoded into wandb's own protobuf
records; MLflow writes to a local `file:` store read back through `MlflowClient`.
"""

import json
import shutil
import struct
import sys

import pytest
from conftest import assert_one_line_error, run_cli
from test_train import SimulatedCrash, library_run, train_args

TOOLS = ("tensorboard", "wandb", "mlflow")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline and quiet, MLflow in a file store of this test: nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # wandb would wrap the test runner's stdout
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # restored after the test
    return store


# ------------------------------------------------------------------ the tools' own readers


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Each tag's (step, value) points as TensorBoard shows them (a resume's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def tensorboard_hparams(log_dir) -> dict:
    from tbparse import SummaryReader

    table = SummaryReader(str(log_dir)).hparams
    return dict(zip(table["tag"], table["value"], strict=True))


def wandb_records(path):
    """The records of a `.wandb` transaction log, as wandb's own protobuf `Record`s.

    The file is wandb's header (`:W&B`, magic, version: 7 bytes) and then LevelDB-log framing:
    32 KiB blocks of chunks (crc32c: 4 bytes, length: 2, type: 1 = full, 2 = first,
    3 = middle, 4 = last). wandb 0.31 ships no Python reader for it.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_offline_runs(run_dir) -> list[dict]:
    """Each offline W&B run under RUN/wandb, oldest first: its id, config and history."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log_file,) = folder.glob("*.wandb")
        run = {"id": None, "config": {}, "history": {}}
        for record in wandb_records(log_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            elif kind == "history":
                # A key with a slash is stored as its parts ("train/loss": ["train", "loss"]).
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                run["history"][record.history.step.num] = items
                continue
            else:
                continue
            run["config"].update({u.key: json.loads(u.value_json) for u in updates})
        runs.append(run)
    return runs


def wandb_scalars(run: dict) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for step, items in sorted(run["history"].items()):
        for key, value in items.items():
            if not key.startswith("_"):
                found.setdefault(key, []).append((step, value))
    return found


def mlflow_run(store: str, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    run = client.get_run(run_id)
    scalars = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    return run, {key: sorted(points) for key, points in scalars.items()}


def state_file(run_dir) -> dict:
    return json.loads((run_dir / "trackers.json").read_text())


def each_tool(run_dir, store) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every tool's scalars of the run, read back by that tool's reader."""
    (wandb_run,) = wandb_offline_runs(run_dir)
    return {
        "tensorboard": tensorboard_scalars(run_dir / "tensorboard"),
        "wandb": wandb_scalars(wandb_run),
        "mlflow": mlflow_run(store, state_file(run_dir)["mlflow"]["run_id"])[1],
    }


# ------------------------------------------------------------------ a run, reported three times


def test_every_tracker_holds_the_runs_losses_and_settings(
    tmp_path, offline, shapes_cache, gpt2_dir
):
    out = tmp_path / "run"
    args = ["--log-every-steps", "30"]
    for tool in TOOLS:
        args += ["--report-to", tool]
    run_cli(*train_args(shapes_cache, out, gpt2_dir, *args), check=0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [20, 40]  # 320 captions in batches of 16

    for tool, scalars in each_tool(out, offline).items():
        # Each epoch's row, as metrics.jsonl holds it, at the epoch's last step.
        for key in ("train_loss", "val_loss", "val_cider", "lr", "epoch"):
            points = scalars[f"epoch/{key}"]
            assert [step for step, _ in points] == [20, 40], (tool, key)
            for (_, value), row in zip(points, rows, strict=True):
                assert value == pytest.approx(row[key], rel=1e-6, abs=1e-12), (tool, key)
        # Steps 30 and 40 of --log-every-steps 30, and each epoch's last step (20 and 40).
        losses = dict(scalars["train/loss"])
        assert sorted(losses) == [20, 30, 40], tool
        # The report at step 20 covers the whole first epoch: its mean is the epoch's loss.
        assert losses[20] == pytest.approx(rows[0]["train_loss"], rel=1e-6), tool
        # Steps 21-30 and 31-40 make the second epoch; its loss lies between their means.
        low, high = sorted((losses[30], losses[40]))
        assert low <= rows[1]["train_loss"] <= high, tool
        assert low < high  # the loss fell within the epoch
        # The learning rate of step 21 is what the schedule reached after epoch 1.
        learning_rates = dict(scalars["train/lr"])
        assert learning_rates[20] > learning_rates[30] > learning_rates[40] > 0
        assert rows[0]["lr"] < learning_rates[20]

    config = json.loads((out / "config.json").read_text())
    settings = {**config["train"], **config["model"]}
    hparams = tensorboard_hparams(out / "tensorboard")
    (wandb_run,) = wandb_offline_runs(out)
    mlflow_params = mlflow_run(offline, state_file(out)["mlflow"]["run_id"])[0].data.params
    for key in ("lr", "batch_size", "epochs", "prefix_length", "seed", "log_every_steps"):
        assert float(hparams[key]) == settings[key], key
        assert wandb_run["config"][key] == settings[key], key
        assert float(mlflow_params[key]) == settings[key], key
    assert json.loads(hparams["report_to"]) == list(TOOLS)
    assert mlflow_params["gpt2_model"] == settings["gpt2_model"] == str(gpt2_dir)
    assert wandb_run["config"]["report_to"] == list(TOOLS)
    assert wandb_run["id"] == state_file(out)["wandb"]["id"]


# ------------------------------------------------------------------ resuming continues the curve


def _crash_after_reporting(monkeypatch, step: int) -> None:
    """Stop the next run right after it reports `step`, as a kill at that moment would."""
    from clipcap_cache.training import loop

    real_report = loop.report_step

    def report_then_crash(state, optimization, trackers):
        real_report(state, optimization, trackers)
        if state.step == step:
            monkeypatch.setattr(loop, "report_step", real_report)
            raise SimulatedCrash

    monkeypatch.setattr(loop, "report_step", report_then_crash)


def test_a_resumed_run_continues_each_trackers_run_and_curve(
    tmp_path, monkeypatch, offline, shapes_cache, gpt2_dir
):
    # One epoch of 40 steps, a report at every step and a resume point every 5. The run is
    # stopped after reporting step 7, so its resume replays steps 6 and 7.
    settings = dict(log_every_steps=1, save_every_steps=5)
    reference = tmp_path / "uninterrupted"
    library_run(reference, shapes_cache, gpt2_dir, monkeypatch, report_to=["mlflow"], **settings)
    expected = dict(mlflow_run(offline, state_file(reference)["mlflow"]["run_id"])[1]["train/loss"])
    assert sorted(expected) == list(range(1, 41))

    out = tmp_path / "resumed"
    _crash_after_reporting(monkeypatch, 7)
    with pytest.raises(SimulatedCrash):
        library_run(out, shapes_cache, gpt2_dir, monkeypatch, report_to=list(TOOLS), **settings)
    first = state_file(out)
    library_run(
        out, shapes_cache, gpt2_dir, monkeypatch, report_to=list(TOOLS), resume=True, **settings
    )
    assert state_file(out) == first  # the same W&B and MLflow runs were reopened
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    # TensorBoard: one log folder, two event files; the replayed steps are shown once.
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 41))
    for step, value in scalars["train/loss"]:
        assert value == pytest.approx(expected[step], rel=1e-6), step
    assert scalars["epoch/train_loss"] == [(40, pytest.approx(row["train_loss"], rel=1e-6))]

    # MLflow: one run, marked failed by the crash and finished by the resume; each step once.
    run, scalars = mlflow_run(offline, first["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 41))
    for step, value in scalars["train/loss"]:
        assert value == pytest.approx(expected[step], rel=1e-6), step
    assert scalars["epoch/train_loss"] == [(40, pytest.approx(row["train_loss"], rel=1e-6))]

    # W&B: two offline segments of one run id, to be synced into one run. The second starts
    # at the resume point; W&B keeps the first value of a step, so 6 and 7 are not doubled.
    killed, resumed = wandb_offline_runs(out)
    assert killed["id"] == resumed["id"] == first["wandb"]["id"]
    killed_loss, resumed_loss = (dict(wandb_scalars(r)["train/loss"]) for r in (killed, resumed))
    assert sorted(killed_loss) == list(range(1, 8))
    assert sorted(resumed_loss) == list(range(6, 41))
    for step, value in {**resumed_loss, **killed_loss}.items():
        assert value == pytest.approx(expected[step], rel=1e-6), step
    assert resumed_loss[6] == pytest.approx(killed_loss[6], rel=1e-6)  # the replay matches


# ------------------------------------------------------------------ the option


def test_report_to_repeats_and_a_resume_keeps_the_runs_tools(monkeypatch, tmp_path):
    from clipcap_cache.training.config import resolve_train_options

    calls = []
    monkeypatch.setattr(
        "clipcap_cache.training.train.train", lambda *configs: calls.append(configs) or {}
    )
    run_cli("train", "f.h5", "--out", tmp_path / "a", check=0)
    run_cli("train", "f.h5", "--out", tmp_path / "b", "--report-to", "wandb",
            "--report-to", "mlflow", "--log-every-steps", "10", check=0)  # fmt: skip
    (default, _), (given, _) = calls
    assert (default.report_to, default.log_every_steps) == ([], 50)
    assert (given.report_to, given.log_every_steps) == (["wandb", "mlflow"], 10)
    # A resume takes the run's own tools from its config.json, unless told otherwise.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"report_to": ["tensorboard"]}}))
    resumed, _ = resolve_train_options({"features": "f.h5", "out": str(run), "resume": True})
    assert resumed.report_to == ["tensorboard"]
    explicit = {"features": "f.h5", "out": str(run), "resume": True, "report_to": ["none"]}
    assert resolve_train_options(explicit)[0].report_to == ["none"]


# ------------------------------------------------------------------ bad input


@pytest.mark.bad_input("data loss")
@pytest.mark.parametrize(("tool", "module"), [(t, t) for t in TOOLS])
def test_a_missing_tracker_package_is_one_line_before_the_run_is_touched(
    tmp_path, monkeypatch, checkpoint_run, shapes_cache, gpt2_dir, tool, module
):
    out = tmp_path / "run"
    shutil.copytree(checkpoint_run, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setitem(sys.modules, module, None)  # its import fails, as when not installed
    result = run_cli(*train_args(shapes_cache, out, gpt2_dir, "--overwrite", "--report-to", tool))
    line = assert_one_line_error(result)
    assert f'pip install "clipcap-cache[{tool}]"' in line and f"--report-to {tool}" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.bad_input("bad option")
@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["comet"], "--report-to must be one of none, tensorboard, wandb, mlflow, not 'comet'"),
        (["none", "wandb"], "--report-to none contradicts --report-to wandb"),
    ],
)
def test_a_bad_report_to_is_one_line(tmp_path, shapes_cache, gpt2_dir, values, message):
    args = [arg for value in values for arg in ("--report-to", value)]
    result = run_cli(*train_args(shapes_cache, tmp_path / "run", gpt2_dir, *args))
    assert message in assert_one_line_error(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.bad_input("bad option")
def test_a_report_to_in_a_config_file_must_be_a_list(tmp_path, shapes_cache, gpt2_dir):
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"report_to": "tensorboard"}))
    result = run_cli(*train_args(shapes_cache, tmp_path / "run", gpt2_dir, "--config", config))
    assert "--report-to must be a list of text, not 'tensorboard'" in assert_one_line_error(result)
