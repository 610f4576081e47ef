"""--report-to: each fold is a tracker run (Accelerate's trackers) holding its settings and metrics."""

import csv
import logging

import pytest
from support import FAST, reset_accelerate

from brats.errors import BratsError
from brats.training.config import make_config
from brats.training.trackers import resolve_trackers


def test_a_fold_logs_its_settings_and_every_epoch_to_mlflow_and_tensorboard(
    cache20, tmp_path, caplog, monkeypatch
):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from brats.training.engine import train_fold

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the tracker sets it for its file store
    run = tmp_path / "exp1"
    cfg = make_config(
        data=str(cache20), run=str(run), fold=2, max_epochs=2, report_to="mlflow,tensorboard", **FAST
    )
    caplog.set_level(logging.INFO)
    try:
        train_fold(cfg)
    finally:
        reset_accelerate()
    store = (run / "mlruns").resolve().as_uri()
    said = caplog.text
    assert f"mlflow: experiment exp1, run fold_2, in {store} (mlflow ui --backend-store-uri {store})" in said
    assert f"tensorboard: {run / 'fold_2'} (tensorboard --logdir {run})" in said
    rows = list(csv.DictReader(open(run / "fold_2" / "metrics.csv")))
    # MLflow: a local file store in the run folder, one run named fold_2, its settings as parameters
    # and each epoch's metrics at step = epoch, equal to metrics.csv's
    client = mlflow.MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "exp1"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "fold_2" and found.info.status == "FINISHED"
    params = found.data.params
    assert params["lr"] == str(cfg.lr) and params["depth"] == "10" and params["fold"] == "2"
    history = client.get_metric_history(found.info.run_id, "val_auc")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([float(r["val_auc"]) for r in rows])
    # TensorBoard: the events of fold_2 in RUN/fold_2, the same scalars
    events = EventAccumulator(str(run / "fold_2"))
    events.Reload()
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([float(r["train_loss"]) for r in rows], rel=1e-6)


def test_report_to_choices_and_a_tracker_not_installed(monkeypatch):
    import brats.training.trackers as trackers

    assert resolve_trackers("none") == [] and resolve_trackers("TensorBoard, mlflow") == [
        "tensorboard",
        "mlflow",
    ]
    monkeypatch.setattr(trackers, "installed", lambda name: name != "wandb")
    assert resolve_trackers("all") == ["tensorboard", "mlflow"] and resolve_trackers("auto") == [
        "tensorboard"
    ]
    with pytest.raises(
        BratsError, match=r"--report-to wandb: wandb not installed: pip install -e '\.\[wandb\]'"
    ):
        resolve_trackers("wandb")
    with pytest.raises(BratsError, match="give auto, all, none, or some of tensorboard, mlflow, wandb"):
        resolve_trackers("comet")
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    assert resolve_trackers("auto") == []  # nothing installed: the default logs nowhere else, quietly
