"""Experiment trackers: TensorBoard, Weights & Biases and MLflow behind one small interface.

    clipcap train data/coco.h5 --out runs/coco --report-to tensorboard --report-to wandb

`--report-to` (repeatable; none by default) names the tools a run reports to. Each one gets the
run's settings as hyper-parameters once, the training loss and learning rate (and under scst the
rewards) every `--log-every-steps` optimizer steps as `train/NAME`, and each epoch's row of
`metrics.jsonl` as `epoch/NAME`, all against the optimizer step. Only the main process reports.

Each tool is an optional extra (`pip install "clipcap-cache[wandb]"`), imported only when a run
asks for it; `check_available` refuses a missing one in one line before anything is written.

Where the records go, and how a resumed run (`--resume`) continues the same curve:

- **tensorboard**: event files in `RUN/tensorboard/` (`tensorboard --logdir runs`). A resume
  writes a new event file in the same folder that tells TensorBoard to drop what the killed
  run logged after its resume point, so the steps the resume replays are not shown twice.
- **wandb**: a W&B run named after the run folder, in project `$WANDB_PROJECT` (default
  `clipcap-cache`), its local files in `RUN/wandb/` (or `$WANDB_DIR`). `WANDB_MODE=offline`
  works as usual. Its id is kept in `RUN/trackers.json`; a resume reopens it with
  `resume="allow"`.
- **mlflow**: a run in experiment `$MLFLOW_EXPERIMENT_NAME` (default `clipcap-cache`) of the
  store `$MLFLOW_TRACKING_URI`, by default the `file:` store `./mlruns` of the working
  directory, as PyTorch Lightning's MLFlowLogger has it. The store and the run id are kept in
  `RUN/trackers.json`; a resume reopens that run and skips the points it already holds.
"""

import dataclasses
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Protocol

from clipcap_cache import distributed
from clipcap_cache.errors import ClipcapError
from clipcap_cache.files import read_json, write_json_atomic

log = logging.getLogger(__name__)

TOOLS = ("tensorboard", "wandb", "mlflow")
REPORT_TO = ("none", *TOOLS)  # the values --report-to takes
# The module each tool needs, and the extra that installs it.
_REQUIRES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
STATE_FILE = "trackers.json"  # the ids a resumed run reopens
# What trackers write inside a run folder: replaced, with the rest of the run, by --overwrite.
RUN_FILES = ("tensorboard", "wandb", STATE_FILE)
DEFAULT_PROJECT = "clipcap-cache"  # the W&B project and the MLflow experiment


class Tracker(Protocol):
    """One experiment-tracking tool, opened for one run."""

    name: str

    def log_hyperparameters(self, params: dict) -> None:
        """Record the run's settings (flat: name -> value)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record values at an optimizer step."""

    def flush(self) -> None:
        """Put what was logged on disk (before a resume point is saved)."""

    def close(self, status: str) -> None:
        """End the run: `status` is "finished", "failed" or "killed" (stopped by a signal)."""

    def state(self) -> dict:
        """What a resume needs to reopen this run, kept in `RUN/trackers.json`."""

    def where(self) -> str:
        """Where the records go, for the log: ": runs/coco/tensorboard"."""


def tools(report_to: list[str]) -> list[str]:
    """The tools `--report-to` names, each once, in order; "none" names none."""
    return [name for name in dict.fromkeys(report_to) if name != "none"]


def check_report_to(report_to: list[str]) -> None:
    """Refuse "none" together with a tool."""
    if "none" in report_to and tools(report_to):
        raise ClipcapError(
            f"--report-to none contradicts --report-to {' '.join(tools(report_to))}: choose one"
        )


def check_available(report_to: list[str]) -> None:
    """Import each tool's package; a missing one is one line that names its extra."""
    for name in tools(report_to):
        try:
            _import(name)
        except ImportError:
            raise ClipcapError(
                f"--report-to {name} needs the {_REQUIRES[name]} package: "
                f'pip install "clipcap-cache[{name}]"'
            ) from None


def _import(name: str):
    if name == "tensorboard":
        import tensorboard  # noqa: F401  torch's writer imports it only when first used
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    if name == "wandb":
        import wandb

        return wandb
    import mlflow  # noqa: F401
    from mlflow.tracking import MlflowClient

    return MlflowClient


class Trackers:
    """The trackers of a run, all called as one.

    Empty without --report-to and on every rank but the main one. Used as a context manager, it
    closes them with the run's outcome.
    """

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log the numbers among `metrics` at `step` to every tracker."""
        numbers = {
            key: float(value)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        for tracker in self.trackers:
            tracker.log_metrics(numbers, step)

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self, status: str = "finished") -> None:
        for tracker in self.trackers:
            try:
                tracker.close(status)
            except Exception as error:  # a tracker that fails to close must not hide the run's end
                log.warning("%s: could not close the run: %s", tracker.name, error)
        self.trackers = []

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        from clipcap_cache.preemption import Preempted

        if kind is None:
            self.close("finished")
        elif issubclass(kind, Preempted | KeyboardInterrupt):
            self.close("killed")
        else:
            self.close("failed")


def hyperparameters(train_config, model_config) -> dict:
    """The run's settings as one flat dict (the field names of the two configs do not clash)."""
    return {**dataclasses.asdict(train_config), **dataclasses.asdict(model_config)}


def open_trackers(
    report_to: list[str], run_dir: Path, params: dict, resume_step: int | None = None
) -> Trackers:
    """Open the trackers `report_to` names for the run in `run_dir`, with its settings `params`.

    `resume_step` is the optimizer step a resumed run continues from (None for a new run): the
    trackers then reopen the runs that `RUN/trackers.json` names. Only the main process opens
    any; the others get an empty `Trackers`. A tool that cannot start is one ClipcapError line.
    """
    names = tools(report_to)
    if not names or not distributed.is_main_process():
        return Trackers()
    saved = {}
    state_path = run_dir / STATE_FILE
    if resume_step is not None and state_path.is_file():
        saved = read_json(state_path, "trackers file")
    opened = Trackers()
    try:
        for name in names:
            opener = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}[name]
            try:
                tracker = opener.open(run_dir, saved.get(name), resume_step)
            except ClipcapError:
                raise
            except Exception as error:
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise ClipcapError(f"--report-to {name}: cannot start: {first_line}") from None
            opened.trackers.append(tracker)
            tracker.log_hyperparameters(params)
        # A tool left out of this resume keeps its run, for a later resume that names it again.
        write_json_atomic(state_path, {**saved, **{t.name: t.state() for t in opened.trackers}})
    except BaseException:
        opened.close("failed")
        raise
    return opened


def _text(value) -> str | int | float | bool:
    """A setting as tools that take only scalars want it: lists and None become text."""
    if isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value)


class TensorBoard:
    """Event files in `RUN/tensorboard/`, through `torch.utils.tensorboard`."""

    name = "tensorboard"

    def __init__(self, writer, log_dir: Path):
        self.writer, self.log_dir = writer, log_dir

    @classmethod
    def open(cls, run_dir: Path, saved: dict | None, resume_step: int | None) -> "TensorBoard":
        summary_writer = _import("tensorboard")
        log_dir = run_dir / "tensorboard"
        # A resume replays the steps after its resume point: TensorBoard hides what the killed
        # run logged from there on (`purge_step`), so each step is shown once.
        purge = None if resume_step is None else resume_step + 1
        return cls(summary_writer(log_dir=str(log_dir), purge_step=purge), log_dir)

    def where(self) -> str:
        return f": {self.log_dir}"

    def log_hyperparameters(self, params: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Written into this run's own event file (SummaryWriter.add_hparams would make a run
        # of its own for them).
        for summary in hparams({k: _text(v) for k, v in params.items()}, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", f"```\n{json.dumps(params, indent=2)}\n```")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()

    def state(self) -> dict:
        return {"log_dir": str(self.log_dir)}


class WandB:
    """A Weights & Biases run; its id is kept so that a resume reopens it."""

    name = "wandb"

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, run_dir: Path, saved: dict | None, resume_step: int | None) -> "WandB":
        wandb = _import("wandb")
        run_id = (saved or {}).get("id") or secrets.token_hex(4)
        directory = Path(os.environ.get("WANDB_DIR") or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(directory),
        )
        return cls(run)

    def where(self) -> str:
        return f": run {self.run.id} in project {self.run.project}"

    def log_hyperparameters(self, params: dict) -> None:
        # A resume may change settings (more --epochs, say): the run's config follows.
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # W&B keeps the first value of a step: points a resume replays are not logged twice.
        self.run.log(metrics, step=step)

    def flush(self) -> None:
        """W&B's service writes the records as they come."""

    def close(self, status: str) -> None:
        if status == "killed":
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "finished" else 1)

    def state(self) -> dict:
        return {"id": self.run.id, "project": self.run.project}


class MLflow:
    """An MLflow run, through `MlflowClient`; its store and id are kept so a resume reopens it."""

    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, client, tracking_uri: str, run_id: str, logged_up_to: dict[str, int]):
        self.client, self.tracking_uri, self.run_id = client, tracking_uri, run_id
        self.logged_up_to = logged_up_to  # metric -> the last step the run already holds

    @classmethod
    def open(cls, run_dir: Path, saved: dict | None, resume_step: int | None) -> "MLflow":
        client_class = _import("mlflow")
        if saved:
            tracking_uri = saved["tracking_uri"]
        else:
            tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or (
                (Path.cwd() / "mlruns").as_uri()
            )
        if tracking_uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless told; it
            # is the store that needs no database (mlflow-skinny has none).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = client_class(tracking_uri)
        logged_up_to: dict[str, int] = {}
        if saved:
            run_id = saved["run_id"]
            run = client.get_run(run_id)
            for key in run.data.metrics:
                history = client.get_metric_history(run_id, key)
                logged_up_to[key] = max((m.step for m in history), default=-1)
            client.update_run(run_id, status="RUNNING")
        else:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            experiment = client.get_experiment_by_name(experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(experiment_name)
            )
            run_id = client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        return cls(client, tracking_uri, run_id, logged_up_to)

    def where(self) -> str:
        return f": run {self.run_id} in {self.tracking_uri}"

    def log_hyperparameters(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow never changes a parameter once logged: a resume adds the new ones only.
        held = self.client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in params.items():
            text = str(_text(value))
            if key not in held:
                new.append(Param(key, text))
            elif held[key] != text:
                changed.append(key)
        if new:
            self.client.log_batch(self.run_id, params=new)
        if changed:
            log.info("mlflow keeps the run's first values of %s", ", ".join(changed))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, value, now, step)
            for key, value in metrics.items()
            if step > self.logged_up_to.get(key, -1)  # a resumed run's replayed steps are held
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def flush(self) -> None:
        """Every call is written through at once."""

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, self._STATUS[status])

    def state(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}
