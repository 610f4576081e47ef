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

from brats.errors import BratsError
from brats.evaluation.ablation import ablation_markdown
from brats.evaluation.cross_validation import evaluate_run
from brats.runs.checkpoint import load_checkpoint, select_checkpoint
from brats.runs.paths import BEST, BEST_EMA, STATE

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_reproduces_stored_auc_and_writes_everything(cv_copy):
    r = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--run", str(cv_copy), "--strict"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(5):
        assert f"fold {k}: EMA checkpoint {cv_copy / f'fold_{k}' / BEST_EMA} (epoch" in r.stderr
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
        # patient by patient, in the precision the checkpoint says it was validated in (fp32 here)
        assert row["validated_in"] == row["rescored_in"] == "no"
        assert row["patients_compared"] == row["n"] and row["max_abs_dp"] <= 1e-5
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
    assert "optimistic" in report and "| Fold | Epoch kept |" in report
    # what deserves trust comes first: the pooled out-of-fold AUC with its CI, then the protocol
    lead = [line for line in report.splitlines()[1:] if line.strip()][:3]
    assert lead[0].startswith(f"**Pooled out-of-fold AUC: {summary['pooled']['auc']:.4f}** (bootstrap 95% CI")
    assert lead[1] == f"Protocol: {summary['protocol']}."
    # 20 patients, 5 of them LGG: the figures are said to mean little
    assert lead[2].startswith("**Warning**: only 20 patients were scored (15 HGG, 5 LGG): too few")
    assert summary["warnings"][0].startswith("only 20 patients")


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
    assert [r.checkpoint for r in summary.folds] == [BEST, BEST]


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
    assert summary.folds[0].rescored_val_auc == pytest.approx(float(ckpt["val_metrics"]["auc"]), abs=1e-6)


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
    assert [r.fold for r in evaluate_run(cv_copy, folds=[0, 1, 2, 4]).folds] == [0, 1, 2, 4]


def test_strict_turns_an_auc_mismatch_into_an_error(cv_copy):
    path = cv_copy / "fold_2" / BEST_EMA
    ckpt = torch.load(path, weights_only=True)
    ckpt["val_metrics"]["auc"] = 0.0 if ckpt["val_metrics"]["auc"] > 0.5 else 1.0  # in range, far off
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
    assert summary.protocol.startswith("inner-validation") and not summary.optimistic
    assert summary.folds[0].n == len(splits["folds"][0]["val"])  # the outer fold is what is scored
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
    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig

    cache = tmp_path / "cache"
    shutil.copytree(cache20, cache)
    cfg = json.loads((cv_copy / "config.json").read_text())
    cfg["data"] = str(cache)
    (cv_copy / "config.json").write_text(json.dumps(cfg))
    prepare(
        find_cases(cache20.parent / "cohort").cases,
        cache,
        PreprocessConfig(size=32),
        progress=False,
        replace=True,
    )
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", cv_copy, "--folds", "1"))
    assert str(cache) in err and str(cv_copy / "fold_1" / BEST_EMA) in err
    assert "size 32" in err and "size 24" in err and "--data" in err
    assert list((cv_copy / "evaluation").iterdir()) == []
    with pytest.raises(BratsError, match="size 32"):
        evaluate_run(cv_copy, folds=[1], data=str(cache))
    assert evaluate_run(cv_copy, folds=[1], data=str(cache20)).folds[0].fold == 1


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


# Seed Table 1 (section 4.2): fold, best epoch, AUC, F1-score, accuracy. BraTS 2018 in 5 stratified
# folds: 42 HGG and 15 LGG patients per fold.
SEED_TABLE_1 = [
    (0, 18, 0.8079, 0.7077, 0.7368),
    (1, 28, 0.9016, 0.8081, 0.8421),
    (2, 26, 0.8952, 0.7970, 0.8246),
    (3, 38, 0.9206, 0.8246, 0.8421),
    (4, 22, 0.8714, 0.6720, 0.6842),
]


def seed_fold_predictions(f1: float, acc: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every (labels, p_hgg) of a 42 HGG / 15 LGG fold whose accuracy and macro-F1 round to the
    seed's: one per confusion matrix that fits."""
    from brats.evaluation.metrics import classification_metrics

    found = []
    for tp in range(43):
        for tn in range(16):
            if round((tp + tn) / 57, 4) != acc:
                continue
            labels = np.array([1] * 42 + [0] * 15)
            p = np.concatenate(
                [
                    np.r_[np.full(tp, 0.9), np.full(42 - tp, 0.1)],
                    np.r_[np.full(tn, 0.1), np.full(15 - tn, 0.9)],
                ]
            )
            if round(classification_metrics(labels, p)["macro_f1"], 4) == f1:
                found.append((labels, p))
    return found


def test_seed_table_1_f1_is_macro_f1_and_the_report_reproduces_it():
    """The seed's F1 values cannot be the F1 of HGG at the seed's accuracies (that is >= 0.72 for
    every row), but each is the macro-F1 of exactly one confusion matrix; the report labels it
    F1 (macro) and reproduces the seed's 4.3 summary from Table 1."""
    from brats.evaluation.cross_validation import FoldResult, summarize_folds
    from brats.evaluation.metrics import classification_metrics
    from brats.evaluation.report import report_markdown

    results = []
    for fold, epoch, auc, f1, acc in SEED_TABLE_1:
        fits = seed_fold_predictions(f1, acc)
        assert len(fits) == 1, (fold, len(fits))
        labels, p = fits[0]
        metrics = classification_metrics(labels, p)
        assert round(metrics["accuracy"], 4) == acc and round(metrics["f1"], 4) != f1
        assert metrics["f1"] > 0.72  # HGG F1 at these accuracies
        metrics["auc"] = auc  # not recoverable from a confusion matrix: the seed's value
        results.append(
            FoldResult(
                fold=fold,
                checkpoint="best_ema.pt",
                is_ema=True,
                epoch=epoch,
                stored_auc=auc,
                rescored_auc=auc,
                metrics=metrics,
                patient_ids=[],
                labels=labels,
                p_hgg=p,
            )
        )
    summary = summarize_folds(results, Path("seed"), inner_val=0.0)
    report = report_markdown(summary, Path("seed"))
    assert "- **AUC**: 0.8793 +- 0.0436" in report  # the seed printed 0.8794 from unrounded values
    assert "- **F1 (macro)**: 0.7619 +- 0.0677" in report
    assert "- **Accuracy**: 0.7860 +- 0.0717" in report
    assert "| F1 (macro) | F1 (HGG) |" in report
    assert "| 0 | 18 | best_ema.pt | 0.8079 | 0.7077 |" in report


def test_evaluate_compares_every_stored_patient_probability(cv_copy):
    """A stored p(HGG) that the re-score does not reproduce is named, patient and size, even when
    the AUC still agrees; --strict refuses it."""
    path = cv_copy / "fold_1" / BEST_EMA
    ckpt = torch.load(path, weights_only=True)
    stored = ckpt["val_probabilities"]
    assert len(stored) == 4 and ckpt["mixed_precision"] == "no"
    patient = sorted(stored)[0]
    stored[patient] = min(1.0, stored[patient] + 0.2) if stored[patient] < 0.5 else stored[patient] - 0.2
    resave(ckpt, path)

    def evaluate(*args: str) -> Result:
        cmd = [sys.executable, str(ROOT / "evaluate.py"), "--run", str(cv_copy), "--folds", "1", *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return Result(r.returncode, r.stdout, r.stderr)

    r = evaluate()
    assert r.code == 0, r.err[-2000:]
    assert f"per patient max |dp| 2.00e-01 over 4 ({patient}), tolerance 0.0001" in r.err
    r = evaluate("--strict")
    assert one_line_error(r).endswith("(--strict)") and patient in one_line_error(r)


def test_rescore_precision_and_cross_precision_tolerance():
    from brats.evaluation.verification import DP_TOLERANCE_CROSS, Verification, rescore_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert rescore_precision("bf16", cuda) == "bf16" and rescore_precision("fp16", cuda) == "fp16"
    assert rescore_precision("bf16", cpu) == "no" and rescore_precision(None, cuda) == "no"
    # trained in bf16, re-scored in fp32 on a CPU: a few 0.01 per patient is expected, and said
    base = dict(stored_auc=0.90, rescored_auc=0.895, max_abs_dp=0.03, worst="P7", compared=57)
    v = Verification(**base, trained="bf16", rescored="no")
    assert v.ok and v.tolerance == DP_TOLERANCE_CROSS
    assert "validated in bf16 during training, re-scored in fp32 on the CPU" in v.text
    assert not Verification(**base, trained="no", rescored="no").ok  # fp32 against fp32: 1e-4
    worse = dict(base, rescored_auc=0.88, max_abs_dp=0.0)
    assert not Verification(**worse, trained="bf16", rescored="bf16").ok  # the AUC still counts
    older = Verification(  # a file without probabilities
        stored_auc=0.90,
        rescored_auc=0.90,
        trained="unknown",
        rescored="no",
        max_abs_dp=None,
        worst="",
        compared=0,
    )
    assert older.ok and "per patient" not in older.text


def png_text(path):
    from PIL import Image

    with Image.open(path) as image:
        return dict(image.text)


def test_the_evaluation_pictures_say_what_they_show(cv_copy):
    """Read from the PNGs' text chunks, which hold every word the figure draws."""
    summary = evaluate_run(cv_copy, calibrate="platt", threshold="youden", force_calibration=True)
    out = cv_copy / "evaluation"
    roc = png_text(out / "roc_all_folds.png")
    assert roc["Title"] == "ROC of every fold and pooled out of fold (HGG positive)"
    words = roc["Description"].split(" | ")
    assert words[:2] == ["false positive rate (LGG called HGG)", "true positive rate (HGG called HGG)"]
    assert "Positive label" not in roc["Description"]
    pooled = summary.pooled["auc"]
    assert words[-1] == f"pooled out-of-fold, 20 patients (AUC = {pooled:.2f})"
    assert [w.split(",")[0] for w in words[2:7]] == [f"fold {k}" for k in range(5)]
    rel = png_text(out / "reliability.png")
    legend = [w for w in rel["Description"].split(" | ") if "Brier" in w]
    cal = summary.calibration
    assert legend == [
        f"raw (Brier {cal['raw']['brier']:.3f})",
        f"platt, cross-fitted (Brier {cal['calibrated']['brier']:.3f})",
    ]
    counts = [int(w[2:]) for w in rel["Description"].split(" | ") if w.startswith("n=")]
    assert counts == [r["n"] for r in cal["raw"]["reliability"]] + [
        r["n"] for r in cal["calibrated"]["reliability"]
    ]
    assert sum(counts) == 2 * 20
    threshold = summary.decision["threshold"]
    for k in range(5):
        confusion = png_text(out / f"fold_{k}" / "confusion_matrix.png")
        row = summary.fold(k)
        assert confusion["Title"] == (
            f"fold {k} epoch {row.best_epoch}: confusion matrix\n"
            f"HGG when p(HGG) (platt-calibrated) >= {threshold:.3g}, the run's decision"
        )
        assert confusion["Description"].split(" | ")[:2] == ["graded", "true grade"]
        assert png_text(out / f"fold_{k}" / "roc_curve.png")["Description"].startswith("false positive rate")
