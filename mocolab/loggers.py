"""Experiment trackers: where a run's scalars go besides ``metrics.jsonl``.

``--logger tensorboard,wandb,mlflow`` (any combination; ``tensorboard`` by default; ``none``)
sends every row the training loop writes to ``metrics.jsonl`` — the same scalars at the same
step — to each tracker, through the tracker's own library:

- ``tensorboard``: event files in ``RUN_DIR/tb`` (``torch.utils.tensorboard``).
- ``wandb``: a Weights & Biases run named after the run directory, the config as its config,
  ``results.json`` (and the report, when ``mocolab report`` makes one) as artifacts. The
  library's own environment variables choose the rest: ``WANDB_PROJECT`` (default
  ``mocolab``), ``WANDB_ENTITY``, ``WANDB_MODE=offline``, ``WANDB_DIR`` (default: the run
  directory).
- ``mlflow``: an MLflow run in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default
  ``mocolab``) of the store ``MLFLOW_TRACKING_URI`` (MLflow's default: ``mlflow.db`` in the
  working directory), the config as parameters, the same artifacts.

A resumed run continues the same tracker runs: their ids are kept in ``RUN_DIR/trackers.json``
(W&B resumes by run id, MLflow by run id in the store recorded there). A resume repeats the
steps after its checkpoint exactly; TensorBoard drops what it had logged after that step
(``purge_step``) and takes the repeated rows, while W&B and MLflow, which only append, are not
sent again the rows they already have (``trackers.json`` records the last one sent).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import ConfigError
from .safeio import quiet_tensorboard_write_errors, write_text_atomic, writing

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}
"""The package each optional tracker needs (and the mocolab extra that installs it)."""
STATE_NAME = "trackers.json"


def parse(spec: str) -> list[str]:
    """The tracker names of a ``--logger`` value: ``"tensorboard,wandb"`` → both, ``"none"`` → [].

    Raises:
        ConfigError: an unknown name, or ``none`` with others.

    >>> parse("tensorboard, mlflow"), parse("none")
    (['tensorboard', 'mlflow'], [])
    """
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in (*TRACKERS, "none")]
    if bad or not names or ("none" in names and len(names) > 1):
        raise ConfigError(
            f"--logger {spec!r}: choose any of {', '.join(TRACKERS)} (comma-separated), or none"
        )
    return [] if names == ["none"] else list(dict.fromkeys(names))


def check(spec: str) -> None:
    """``--logger`` names known trackers whose packages are installed (nothing is imported).

    Raises:
        ConfigError: one line naming the missing package and the extra that installs it.
    """
    for name in parse(spec):
        package = PACKAGES.get(name)
        if package is not None and not _installed(package):
            raise ConfigError(
                f"--logger {name} needs the {package} package: pip install 'mocolab[{name}]' "
                f"(or pip install {package})"
            )


def _installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _require(package: str, name: str) -> Any:
    try:
        return __import__(package)
    except ImportError:
        raise ConfigError(
            f"--logger {name} needs the {package} package: pip install 'mocolab[{name}]' "
            f"(or pip install {package})"
        ) from None


class Tracker(Protocol):
    """One experiment tracker of a run.

    Attributes:
        name: its ``--logger`` name.
        replays: ``True`` when, on resume, it drops what it logged after the checkpoint itself
            (TensorBoard), so that the repeated rows are sent again; ``False`` for trackers that
            only append (W&B, MLflow): rows they have are not sent twice.
    """

    name: str
    replays: bool

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Record ``scalars`` at training step ``step``."""

    def log_artifact(self, path: Path) -> None:
        """Keep the file or folder ``path`` with the run."""

    def close(self, status: str) -> None:
        """End the run: ``FINISHED``, ``KILLED`` (stopped, resumable) or ``FAILED``."""


class TensorBoardTracker:
    """Scalars as TensorBoard events in ``RUN_DIR/tb``."""

    name = "tensorboard"
    replays = True

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        quiet_tensorboard_write_errors()
        self.dir = run_dir / "tb"
        # events from the checkpoint's next step on are hidden: the resumed run logs them again
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(self.dir), purge_step=purge)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        with writing(self.dir):
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        pass  # TensorBoard keeps scalars; the files sit in the run directory already

    def close(self, status: str) -> None:
        with writing(self.dir):
            self.writer.close()


class WandbTracker:
    """A Weights & Biases run (resumed by its id on ``--resume``)."""

    name = "wandb"
    replays = False

    def __init__(self, run_dir: Path, config: Mapping[str, Any], state: dict[str, Any]) -> None:
        wandb = _require("wandb", self.name)
        self.wandb = wandb
        self.run = wandb.init(
            project=state.get("project") or os.environ.get("WANDB_PROJECT") or "mocolab",
            entity=state.get("entity") or os.environ.get("WANDB_ENTITY") or None,
            id=state.get("id"),  # None: W&B makes one, kept for --resume
            name=run_dir.name,
            resume="allow",
            config=dict(config),
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            job_type="pretrain",
            reinit="create_new",
        )
        state.update(id=self.run.id, project=self.run.project, entity=self.run.entity or None)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def log_artifact(self, path: Path) -> None:
        kind = "report" if path.is_dir() else path.stem
        artifact = self.wandb.Artifact(f"{self.run.id}-{kind}", type=kind)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        if status == "KILLED":
            self.run.mark_preempting()  # stopped to be resumed, not failed
        self.run.finish(exit_code=1 if status == "FAILED" else 0)


class MLflowTracker:
    """An MLflow run: the config as parameters, the scalars as metrics (resumed by its id)."""

    name = "mlflow"
    replays = False

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    @classmethod
    def start(
        cls, run_dir: Path, config: Mapping[str, Any], state: dict[str, Any]
    ) -> MLflowTracker:
        """A new run (the config as its parameters), or the run of ``state`` continued."""
        mlflow = _require("mlflow", cls.name)
        uri = state.get("tracking_uri") or mlflow.get_tracking_uri()
        if state.get("run_id"):
            tracker = cls(uri, str(state["run_id"]))
            tracker.client.update_run(tracker.run_id, status="RUNNING")
        else:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mocolab"
            experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
            if experiment is None:
                found = client.get_experiment_by_name(name)
                experiment = found.experiment_id if found else client.create_experiment(name)
            run = client.create_run(
                experiment,
                run_name=run_dir.name,
                tags={"mocolab.run_dir": str(run_dir.resolve())},
            )
            tracker = cls(uri, run.info.run_id)
            tracker._log_params(config)
        state.update(run_id=tracker.run_id, tracking_uri=uri)
        return tracker

    def _log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """The trackers of one run, fed the rows of ``metrics.jsonl`` (see the module's text).

    Args:
        spec: the ``--logger`` value.
        run_dir: the run directory (``trackers.json`` is kept there).
        config: the run's options (W&B's config, MLflow's parameters).
        resume_step: the checkpoint's step when resuming, else ``None``.
    """

    def __init__(
        self,
        spec: str,
        run_dir: Path,
        config: Mapping[str, Any],
        resume_step: int | None = None,
    ) -> None:
        names = parse(spec)
        check(spec)
        self.path = run_dir / STATE_NAME
        key = self.path.resolve()
        if key in _OPEN:  # left open by an error in this process (a notebook): ended first
            _OPEN.pop(key).close("FAILED")
        state: dict[str, Any] = {}
        if resume_step is not None and self.path.exists():
            state = json.loads(self.path.read_text())
        # (step, n): the n-th row at that step was the last one the appending trackers got
        sent = state.get("sent") or [-1, 0]
        self.sent = (int(sent[0]), int(sent[1]))
        self.row = (-1, 0)
        self.state = state
        self.trackers: list[Tracker] = []
        for name in names:
            if name == "tensorboard":
                try:
                    self.trackers.append(TensorBoardTracker(run_dir, resume_step))
                except ImportError:  # a dependency of mocolab, but optional at run time
                    print(
                        "mocolab: warning: tensorboard is not installed; not logged there",
                        file=sys.stderr,
                    )
            elif name == "wandb":
                self.trackers.append(WandbTracker(run_dir, config, state.setdefault(name, {})))
            else:
                self.trackers.append(
                    MLflowTracker.start(run_dir, config, state.setdefault(name, {}))
                )
        self.appending = any(not t.replays for t in self.trackers)
        if self.appending:
            self._save()
        _OPEN[key] = self

    def _save(self) -> None:
        self.state["sent"] = list(self.sent)
        write_text_atomic(self.path, json.dumps(self.state, indent=2) + "\n")

    def log(self, row: Mapping[str, Any]) -> None:
        """Send a row of ``metrics.jsonl`` (``step`` and scalars) to every tracker."""
        step = int(row["step"])
        self.row = (step, self.row[1] + 1 if self.row[0] == step else 1)
        scalars = {
            k: float(v)
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        new = self.row > self.sent
        for tracker in self.trackers:
            if tracker.replays or new:
                tracker.log(scalars, step)
        if new and self.appending:
            self.sent = self.row
            self._save()

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for path in paths:
            for tracker in self.trackers:
                tracker.log_artifact(path)

    def close(self, status: str = "KILLED") -> None:
        _OPEN.pop(self.path.resolve(), None)
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(status)


_OPEN: dict[Path, Trackers] = {}  # the trackers of the runs this process has open


def attach_artifact(run_dir: Path, path: Path) -> list[str]:
    """Add ``path`` (a report made after the run) to the run's W&B and MLflow runs recorded in
    its ``trackers.json``; the names of the trackers it went to. A tracker whose package is
    missing now is skipped with a one-line warning."""
    state_path = run_dir / STATE_NAME
    if not state_path.exists():
        return []
    state = json.loads(state_path.read_text())
    done = []
    for name in ("wandb", "mlflow"):
        if not state.get(name):
            continue
        if not _installed(PACKAGES[name]):
            print(
                f"mocolab: warning: the run logs to {name}, but {name} is not installed; "
                f"the report was not added there (pip install 'mocolab[{name}]')",
                file=sys.stderr,
            )
            continue
        if name == "wandb":
            tracker = WandbTracker(run_dir, {}, state[name])  # resumed by its id
            tracker.log_artifact(path)
            tracker.close("FINISHED")
        else:  # MLflow adds artifacts to a finished run as it is
            MLflowTracker(state[name]["tracking_uri"], state[name]["run_id"]).log_artifact(path)
        done.append(name)
    return done
