"""A researcher's first hour: results that warn when they mean nothing, guards that refuse a
setting before any file is written, and messages that say what was kept."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from clitools import one_line_error, run_cli
from support import TINY_SHAPE

from brats.data.phantom import make_cohort
from brats.evaluation.calibration import decide
from brats.evaluation.cross_validation import result_warnings
from brats.evaluation.report import report_markdown
from brats.runs.summary import Summary
from brats.training.config import make_config


def test_an_inner_validation_a_small_fold_cannot_spare_is_refused_before_anything_is_written(
    tmp_path, capsys
):
    """6 patients (4 HGG, 2 LGG) in 2 folds: each fold trains on one LGG, none to validate on.
    Refused in one line before the raw cohort is prepared or splits.json written."""
    root = tmp_path / "cohort"
    make_cohort(root, 6, seed=2, shape=TINY_SHAPE, workers=1)
    run = tmp_path / "run"
    args = ("--data", root, "--run", run, "--k-folds", "2", "--inner-val", "0.15", "--size", "24")
    err = one_line_error(run_cli(capsys, "train.py", *args, "--depth", "10", "--no-progress"))
    assert (
        "--inner-val 0.15: fold 0's training patients hold 2 HGG and 1 LGG" in err and "--inner-val 0" in err
    )
    assert not (run / "splits.json").exists() and not (tmp_path / "cohort_cache24").exists()


def test_figures_that_mean_little_are_said_to(tmp_path):
    small = SimpleNamespace(pooled={"n": 4, "hgg": 2, "lgg": 2}, calibration={})
    cfg = make_config(data="x", max_epochs=2)  # the final policy warms up for 3 epochs
    warned = result_warnings(small, cfg)
    assert warned[0].startswith("only 4 patients were scored (2 HGG, 2 LGG): too few for the AUC")
    assert warned[1].startswith("--max-epochs 2 is not longer than the 3 warm-up epochs")
    fine = SimpleNamespace(pooled={"n": 285, "hgg": 210, "lgg": 75}, calibration={})
    assert result_warnings(fine, make_config(data="x")) == []


def test_a_calibration_fitted_on_separated_grades_is_refused_even_when_forced():
    """Four patients ranked perfectly: Platt's slope runs off and would turn p = 0.49-0.51 into 0 and 1."""
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    p = np.array([0.49, 0.495, 0.505, 0.51, 0.492, 0.508, 0.494, 0.506])
    folds = np.arange(8) % 2
    for force in (False, True):
        decision, figures = decide(labels, p, folds, "platt", "0.5", force=force)
        assert decision.calibration == "none" and "beyond 10" in figures["not_shipped"]["reason"]
    summary = SimpleNamespace(pooled={"n": 8, "hgg": 4, "lgg": 4}, calibration=figures)
    assert any(
        w.startswith("--calibrate platt was refused: its slope")
        for w in result_warnings(summary, make_config(data="x"))
    )


def test_the_report_names_the_epoch_kept_and_says_f1_is_kept_high_only_by_a_majority(exported):
    run, _ = exported
    summary = Summary.from_json(json.loads((run / "evaluation" / "summary.json").read_text()))
    report = report_markdown(summary, run)
    assert "| Fold | Epoch kept |" in report and "which the HGG majority keeps high" in report
    flipped = dataclasses.replace(summary, pooled={**summary.pooled, "hgg": 5, "lgg": 15})
    assert "majority keeps high" not in report_markdown(flipped, run)


def test_evaluate_and_export_end_with_the_files_written_and_the_next_command(cv_copy, capsys):
    r = run_cli(capsys, "evaluate.py", "--run", cv_copy)
    assert r.code == 0, r.err[-2000:]
    tail = r.out.splitlines()[-8:]
    evaluation = cv_copy / "evaluation"
    assert tail[0] == "wrote:" and [line.split()[0] for line in tail[1:-1]] == [
        str(evaluation / name)
        for name in (
            "report.md",
            "summary.json",
            "predictions.csv",
            "roc_all_folds.png",
            "reliability.png",
            "fold_K",
        )
    ]
    assert all(
        (evaluation / name).is_file() for name in ("report.md", "roc_all_folds.png", "reliability.png")
    )
    assert tail[-1].startswith(f"next: python export.py --run {cv_copy} --ensemble ")
    r = run_cli(capsys, "export.py", "--run", cv_copy, "--ensemble", "--no-doubt")
    assert r.code == 0, r.err[-2000:]
    model = cv_copy / "model_ensemble.onnx"
    tail = r.out.splitlines()[-5:]
    assert tail[0] == "wrote:" and [line.split()[0] for line in tail[1:4]] == [
        str(model),
        str(cv_copy / "model_ensemble_card.md"),
        str(cv_copy / "model_ensemble_card.json"),
    ]
    assert all(Path(line.split()[0]).is_file() for line in tail[1:4])
    assert tail[-1].startswith(f"next: python predict.py {model} PATIENTS --out predictions.csv")


def test_a_make_demo_rerun_redoes_only_what_is_out_of_date(tmp_path):
    """`make -n` on the demo's files, made in the order the demo makes them: nothing is redone;
    a newer evaluation redoes the export and the prediction only; a newer cache also the training."""
    import os
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(root / name, tmp_path / name)
    made = [
        "pyproject.toml",
        ".venv/bin/python",
        ".venv/.installed",
        "demo/cohort/.done",
        "demo/new/.done",
        "demo/cache/index.json",
        "demo/run/evaluation/summary.json",
        "demo/run/model_ensemble.onnx",
        "demo/predictions.csv",
    ]
    for i, name in enumerate(made):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))

    def planned() -> list[str]:
        r = subprocess.run(["make", "-n", "demo"], cwd=tmp_path, capture_output=True, text=True, check=True)
        return [line for line in r.stdout.splitlines() if line.startswith(".venv/bin/")]

    assert planned() == []
    os.utime(tmp_path / "demo/run/evaluation/summary.json", (2_000_000, 2_000_000))
    assert [line.split()[1] for line in planned()] == ["export.py", "predict.py"]
    os.utime(tmp_path / "demo/cache/index.json", (3_000_000, 3_000_000))
    assert any(
        "make" in line and "cv DATA=demo/cache" in line
        for line in subprocess.run(
            ["make", "-n", "demo"], cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    )


def test_export_evaluating_the_missing_folds_keeps_the_decision_options_used(cv_copy, tmp_path):
    from brats.evaluation.cross_validation import evaluate_run
    from brats.evaluation.export import export

    evaluate_run(cv_copy, [0, 1], calibrate="platt", threshold="sensitivity:0.9")
    export(cv_copy, tmp_path / "m.onnx", ensemble=True, doubt=False)
    summary = Summary.read(cv_copy / "evaluation" / "summary.json", "")
    assert [row.fold for row in summary.folds] == [0, 1, 2, 3, 4]
    assert summary.decision_options()["calibrate"] == "platt"
    assert summary.decision["rule"] == "sensitivity:0.9"


def test_the_reproduce_flags_keep_every_setting_train_py_can_set():
    from brats.runs.identity import recipe_flags

    cfg = make_config(
        data="x", pretrained="w.pth", layout="strided", lr=1.23456789e-4, ldam_s=20.0, augment=False
    )
    flags = recipe_flags(cfg.to_dict())
    assert flags == ["--layout", "strided", "--pretrained", "w.pth", "--lr", "0.000123456789", "--no-augment"]
    again = make_config(
        data="x", pretrained="w.pth", layout="strided", lr=float("0.000123456789"), augment=False
    )
    assert (again.layout, again.lr, again.augment) == (cfg.layout, cfg.lr, cfg.augment)
