import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from support import resave, train_cv

from brats.ablation import ablation_markdown
from brats.checkpoint import BEST, BEST_EMA, STATE, load_checkpoint, select_checkpoint
from brats.errors import BratsError
from brats.evaluation import evaluate_run

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_reproduces_stored_auc_and_writes_everything(cv_copy):
    r = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--run", str(cv_copy), "--strict"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(5):
        assert f"fold {k}: EMA best checkpoint {cv_copy / f'fold_{k}' / BEST_EMA}" in r.stderr
    out = cv_copy / "evaluation"
    summary = json.loads((out / "summary.json").read_text())
    assert {p.name for p in out.iterdir()} >= {
        "summary.json",
        "report.md",
        "predictions.csv",
        "roc_all_folds.png",
    }
    for k in range(5):
        assert {p.name for p in (out / f"fold_{k}").iterdir()} >= {
            "roc_curve.png",
            "pr_curve.png",
            "confusion_matrix.png",
        }
    for row in summary["folds"]:
        assert row["checkpoint"] == BEST_EMA and row["is_ema"]
        assert abs(row["rescored_val_auc"] - row["stored_val_auc"]) <= 1e-6
    # every number equals scikit-learn's computed from predictions.csv
    with open(out / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 20 and len({p["patient_id"] for p in preds}) == 20
    y = np.array([int(p["label"]) for p in preds])
    p = np.array([float(p["p_hgg"]) for p in preds])
    folds = np.array([int(p["fold"]) for p in preds])
    for row in summary["folds"]:
        m = folds == row["fold"]
        assert row["auc"] == pytest.approx(roc_auc_score(y[m], p[m]), abs=1e-12)
        assert row["accuracy"] == pytest.approx(((p[m] >= 0.5) == y[m]).mean(), abs=1e-12)
    assert summary["pooled"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    lo, hi = summary["pooled"]["auc_ci95"]
    assert lo <= summary["pooled"]["auc"] <= hi
    assert summary["pooled"]["majority_class_accuracy"] == pytest.approx(15 / 20)
    aucs = [row["auc"] for row in summary["folds"]]
    assert summary["mean_std"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert summary["mean_std"]["auc"]["std"] == pytest.approx(np.std(aucs, ddof=1))
    report = (out / "report.md").read_text()
    assert "optimistic" in report and "| Fold | Best Epoch |" in report


def test_policy_selection(cv_copy):
    fold = cv_copy / "fold_0"
    assert select_checkpoint(fold, ema_enabled=True) == fold / BEST_EMA
    assert select_checkpoint(fold, ema_enabled=False) == fold / BEST
    (fold / BEST_EMA).unlink()
    assert select_checkpoint(fold, ema_enabled=True) == fold / BEST
    (fold / BEST).unlink()
    assert (fold / STATE).exists()
    with pytest.raises(BratsError, match="no best.pt or best_ema.pt \\(never falling back to state.pt\\)"):
        select_checkpoint(fold, ema_enabled=True)
    # a run without EMA is scored from best.pt even when an EMA file lies there
    cfg = json.loads((cv_copy / "config.json").read_text())
    cfg["ema_decay"] = 0.0
    (cv_copy / "config.json").write_text(json.dumps(cfg))
    summary = evaluate_run(cv_copy, folds=[1, 2])
    assert [r["checkpoint"] for r in summary["folds"]] == [BEST, BEST]


def test_legacy_pickled_checkpoint_needs_trust_flag(cv_copy):
    path = cv_copy / "fold_0" / BEST_EMA
    ckpt = torch.load(path, weights_only=True)
    ckpt["args"] = argparse.Namespace(lr=1e-4, batch_size=2)  # what older training code saved
    ckpt["val_metrics"]["auc"] = np.float64(ckpt["val_metrics"]["auc"])
    resave(ckpt, path)
    with pytest.raises(BratsError, match="pass --trust-checkpoints"):
        load_checkpoint(path)
    r = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--run", str(cv_copy), "--folds", "0"],
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 1
        and r.stderr.strip().splitlines()[-1].startswith("error: ")
        and "--trust-checkpoints" in r.stderr
    )
    assert "Traceback" not in r.stderr
    summary = evaluate_run(cv_copy, folds=[0], trust=True)
    assert summary["folds"][0]["rescored_val_auc"] == pytest.approx(
        float(ckpt["val_metrics"]["auc"]), abs=1e-6
    )


def test_checkpoint_must_hold_weights_and_metrics(cv_copy):
    path = cv_copy / "fold_0" / BEST_EMA
    ckpt = torch.load(path, weights_only=True)
    del ckpt["val_metrics"]
    resave(ckpt, path)
    with pytest.raises(BratsError, match="lacks val_metrics"):
        evaluate_run(cv_copy, folds=[0])


def test_splits_mismatch_is_refused(cv_copy):
    path = cv_copy / "fold_3" / BEST_EMA
    ckpt = torch.load(path, weights_only=True)
    ckpt["splits_fingerprint"] = "0123456789abcdef"
    resave(ckpt, path)
    with pytest.raises(BratsError, match="trained on splits 0123456789abcdef"):
        evaluate_run(cv_copy, folds=[3])


def test_missing_fold_listed_unless_left_out(cv_copy):
    shutil.rmtree(cv_copy / "fold_3")
    with pytest.raises(BratsError, match="fold\\(s\\) 3 not trained"):
        evaluate_run(cv_copy)
    assert [r["fold"] for r in evaluate_run(cv_copy, folds=[0, 1, 2, 4])["folds"]] == [0, 1, 2, 4]


def test_strict_turns_an_auc_mismatch_into_an_error(cv_copy):
    path = cv_copy / "fold_2" / BEST_EMA
    ckpt = torch.load(path, weights_only=True)
    ckpt["val_metrics"]["auc"] = ckpt["val_metrics"]["auc"] - 0.5
    resave(ckpt, path)
    evaluate_run(cv_copy, folds=[2])  # a warning only
    with pytest.raises(BratsError, match="fold 2: re-scored val AUC .* differs from the stored .*--strict"):
        evaluate_run(cv_copy, folds=[2], strict=True)


def test_inner_validation_protocol(cache20, tmp_path):
    run = train_cv(cache20, tmp_path / "inner", max_epochs=1, inner_val=0.25, folds=2)
    splits = json.loads((run / "splits.json").read_text())
    assert splits["inner_val"] == 0.25 and all("inner_val" in f for f in splits["folds"])
    for f in splits["folds"]:
        assert not set(f["inner_val"]) & set(f["val"])
    ckpt = torch.load(run / "fold_0" / BEST, weights_only=True)
    assert ckpt["val_patients"] == splits["folds"][0]["inner_val"]
    summary = evaluate_run(run)
    assert summary["protocol"].startswith("inner-validation") and not summary["optimistic"]
    assert summary["folds"][0]["n"] == len(splits["folds"][0]["val"])  # the outer fold is what is scored
    assert "optimistic" not in (run / "evaluation" / "report.md").read_text()


def test_ablation_table(cache20, cv_copy, tmp_path):
    baseline = train_cv(cache20, tmp_path / "baseline", policy="baseline", max_epochs=1)
    evaluate_run(baseline)
    evaluate_run(cv_copy)
    text = ablation_markdown(baseline, cv_copy)
    assert "policy baseline" in text and "policy final" in text
    assert text.count("\n| 0 |") == 2 and "| mean +- std |" in text
    splits = json.loads((cv_copy / "splits.json").read_text())
    a, b = splits["folds"][0]["val"], splits["folds"][1]["val"]
    a[0], b[0] = b[0], a[0]  # other folds, same cohort
    (cv_copy / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(BratsError, match="not trained on the same folds"):
        ablation_markdown(baseline, cv_copy)
