"""Experiment trackers for a fold (--report-to): TensorBoard, MLflow, Weights & Biases.

Accelerate's own tracker classes (accelerate.tracking) do the logging; this module decides
which are used, where each fold's run lands, and says it in the log. Every fold is one tracker
run named `fold_K`, holding the fold's settings as hyperparameters and each epoch's metrics.csv
row as scalars (step = epoch):

- tensorboard: event files in RUN/fold_K/ (`tensorboard --logdir RUN` shows every fold);
- mlflow: experiment = the run folder's name, in MLFLOW_TRACKING_URI or else a file store in
  RUN/mlruns (`mlflow ui --backend-store-uri file:RUN/mlruns`);
- wandb: project = the run folder's name (WANDB_* settings apply as usual).

`auto` (the default) is TensorBoard when it is installed, else nothing; `all` is every one that
is installed. A tracker asked for by name and not installed is refused before anything slow.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from brats.errors import BratsError

log = logging.getLogger(__name__)

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> module
CHOICES = ("auto", "all", "none", *TRACKERS)


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name]) is not None


def resolve_trackers(spec: str) -> list[str]:
    """--report-to as tracker names: auto, all, none, or a comma list of them."""
    words = [w.strip().lower() for w in spec.split(",") if w.strip()] or ["none"]
    unknown = [w for w in words if w not in CHOICES]
    if unknown or (len(words) > 1 and set(words) & {"auto", "all", "none"}):
        raise BratsError(
            f"--report-to {spec!r}: give auto, all, none, or some of {', '.join(TRACKERS)} (comma-separated)"
        )
    if words == ["none"]:
        return []
    if words == ["auto"]:
        return ["tensorboard"] if installed("tensorboard") else []
    if words == ["all"]:
        return [name for name in TRACKERS if installed(name)]
    missing = [w for w in words if not installed(w)]
    if missing:
        extras = ",".join(missing)  # each tracker is also the name of its pyproject extra
        raise BratsError(
            f"--report-to {spec}: {' and '.join(missing)} not installed: pip install -e '.[{extras}]' "
            "(or choose --report-to none)"
        )
    return list(dict.fromkeys(words))


def start_trackers(names: list[str], run: Path, fold: int, config: dict) -> list:
    """The fold's trackers, started, with its settings logged as hyperparameters; none on the
    other processes (W&B's tracker would open a run on each)."""
    from accelerate.state import PartialState

    if not PartialState().is_main_process:
        return []
    trackers = []
    run_name, experiment = f"fold_{fold}", Path(run).resolve().name
    for name in names:
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            tracker = TensorBoardTracker(run_name, run)
            where = f"{Path(run) / run_name} (tensorboard --logdir {run})"
        elif name == "mlflow":
            from accelerate.tracking import MLflowTracker

            uri = mlflow_store(run)
            tracker = MLflowTracker(experiment, run_name=run_name)
            where = f"experiment {experiment}, run {run_name}, in {uri} (mlflow ui --backend-store-uri {uri})"
        else:
            from accelerate.tracking import WandBTracker

            tracker = WandBTracker(experiment, name=run_name)
            where = f"project {experiment}, run {run_name}"
        tracker.start()
        tracker.store_init_configuration(config)
        trackers.append(tracker)
        log.info(f"{name}: {where}")
    return trackers


def mlflow_store(run: Path) -> str:
    """Where MLflow writes: MLFLOW_TRACKING_URI when set (a tracking server, a database), else a
    file store in RUN/mlruns, beside the run it describes. MLflow 3 keeps its file store only
    behind MLFLOW_ALLOW_FILE_STORE, which is set for that case unless the user set it."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (Path(run).resolve() / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return uri


def log_metrics(trackers: list, row: dict, step: int) -> None:
    for tracker in trackers:
        tracker.log(row, step=step)


def finish_trackers(trackers: list) -> None:
    for tracker in trackers:
        tracker.finish()
