import argparse
import contextlib
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import Result, deny_writes, disk_full, one_line_error, run_cli, temps
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


# --- the cache must be preprocessed as the checkpoint's was


def test_evaluate_refuses_a_cache_prepared_again_at_another_size(cv_copy, cache20, tmp_path, capsys):
    from brats.cache import prepare
    from brats.cohort import find_cases
    from brats.preprocess import PreprocessConfig

    cache = tmp_path / "cache"
    shutil.copytree(cache20, cache)
    cfg = json.loads((cv_copy / "config.json").read_text())
    cfg["data"] = str(cache)
    (cv_copy / "config.json").write_text(json.dumps(cfg))
    prepare(find_cases(cache20.parent / "cohort").cases, cache, PreprocessConfig(size=32), progress=False)
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", cv_copy, "--folds", "1"))
    assert str(cache) in err and str(cv_copy / "fold_1" / BEST_EMA) in err
    assert "size 32" in err and "size 24" in err and "--data" in err
    assert list((cv_copy / "evaluation").iterdir()) == []
    with pytest.raises(BratsError, match="size 32"):
        evaluate_run(cv_copy, folds=[1], data=str(cache))
    assert evaluate_run(cv_copy, folds=[1], data=str(cache20))["folds"][0]["fold"] == 1


# --- one line instead of a traceback


def test_evaluate_unknown_device_is_one_line(cv_copy, capsys):
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", cv_copy, "--device", "foo"))
    assert "--device 'foo'" in err
    assert not (cv_copy / "evaluation").exists()


@pytest.mark.parametrize(
    "content", ["garbage{", '{"depth": 10, "fol', '["a"]', '{"folds": "five", "data": "x"}']
)
def test_evaluate_corrupt_config_is_one_line(cv_copy, capsys, content):
    (cv_copy / "config.json").write_text(content)
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", cv_copy))
    assert str(cv_copy / "config.json") in err and "train.py" in err


@pytest.mark.parametrize("where", ["file", "read_only_run", "summary_is_a_folder"])
def test_evaluate_output_problems_are_one_line_before_scoring(cv_copy, capsys, caplog, where):
    out = cv_copy / "evaluation"
    if where == "file":
        out.write_text("x")
    elif where == "summary_is_a_folder":
        (out / "summary.json").mkdir(parents=True)
    with deny_writes(cv_copy) if where == "read_only_run" else contextlib.nullcontext():
        r = run_cli(capsys, "evaluate.py", "--run", cv_copy, "--folds", "0")
    err = one_line_error(r)
    assert str(out) in err
    assert not (out / "fold_0").exists()  # refused before scoring
    assert "re-scored val AUC" not in caplog.text and temps(cv_copy) == []


def test_evaluate_on_a_full_disk_keeps_the_previous_results(cv_copy, capsys, monkeypatch):
    evaluate_run(cv_copy, folds=[0])
    out = cv_copy / "evaluation"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    disk_full(monkeypatch)
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", cv_copy, "--folds", "0,1"))
    assert "disk is full" in err and str(out) in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert temps(cv_copy) == []


def test_evaluate_removes_a_killed_evaluation_s_temps(cv_copy):
    out = cv_copy / "evaluation"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = out / f".tmp-{int(dead.stdout)}-evaluation.part"
    (stale / "fold_0").mkdir(parents=True)
    (stale / "fold_0" / "roc_curve.png").write_bytes(b"\0")
    evaluate_run(cv_copy, folds=[0])
    assert temps(cv_copy) == [] and (out / "fold_0" / "roc_curve.png").stat().st_size > 1


def test_ablation_errors_are_one_line(cv_copy, tmp_path, capsys):
    r = run_ablation(capsys, tmp_path / "nowhere", cv_copy)
    assert str(tmp_path / "nowhere") in one_line_error(r)
    r = run_ablation(capsys, cv_copy, cv_copy)  # not evaluated
    assert "python evaluate.py --run" in one_line_error(r)
    (cv_copy / "evaluation").mkdir()
    for content in ("garbage{", '{"folds": [{"fold": 0}]}', "[]"):
        (cv_copy / "evaluation" / "summary.json").write_text(content)
        err = one_line_error(run_ablation(capsys, cv_copy, cv_copy))
        assert (
            str(cv_copy / "evaluation" / "summary.json") in err
            and f"python evaluate.py --run {cv_copy}" in err
        )
    (cv_copy / "splits.json").write_text("{")
    err = one_line_error(run_ablation(capsys, cv_copy, cv_copy))
    assert str(cv_copy / "splits.json") in err


def run_ablation(capsys, *args):
    import runpy

    argv = sys.argv
    sys.argv = ["brats.ablation", *map(str, args)]
    capsys.readouterr()
    try:
        runpy.run_module("brats.ablation", run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    c = capsys.readouterr()
    return Result(code, c.out, c.err)
