"""Before/after table of two evaluated runs on the same folds (RECIPE.md 2, measured).

`python -m brats.ablation RUN_BEFORE RUN_AFTER` is its command line.

Per fold: AUC, macro F1 (the report's F1, RECIPE.md 4), accuracy of each run; mean +- sample std; and the
stability figures of RECIPE.md 2 from each fold's metrics.csv: std of val AUC over epochs, min/max
training loss, epochs run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from brats.data.folds import read_splits
from brats.errors import BratsError
from brats.runs.paths import RunPaths
from brats.runs.reader import load_summary, run_config


def load_run(run: Path) -> dict:
    summary = load_summary(run)
    config = run_config(run)
    stability = []
    for row in summary.folds:
        path = RunPaths(run).metrics(row.fold)
        try:
            with open(path) as f:
                epochs = list(csv.DictReader(f))
            auc = np.array([float(e["val_auc"]) for e in epochs])
            loss = np.array([float(e["train_loss"]) for e in epochs])
            if not len(epochs):
                raise ValueError("no epochs")
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise BratsError(
                f"{path}: cannot read the fold's training log ({type(e).__name__}: {str(e)[:120]}): "
                "train.py writes it; compare runs whose folds are trained"
            ) from e
        stability.append(
            {
                "fold": row.fold,
                "val_auc_std": float(np.nanstd(auc, ddof=1)) if len(auc) > 1 else 0.0,
                "train_loss_min": float(loss.min()),
                "train_loss_max": float(loss.max()),
                "epochs": len(epochs),
            }
        )
    return {"summary": summary, "stability": stability, "config": config}


def fold_patients(run: Path) -> tuple[str, list]:
    """(cohort fingerprint, each fold's validation patients) of RUN/splits.json."""
    d = read_splits(RunPaths(run).splits)
    return d["cohort_fingerprint"], [f["val"] for f in d["folds"]]


def check_same_folds(a: Path, b: Path) -> None:
    if fold_patients(a) != fold_patients(b):
        raise BratsError(
            f"{a} and {b} were not trained on the same folds: "
            "compare runs made with the same cohort and --split-seed"
        )


def ablation_markdown(before: Path, after: Path) -> str:
    for run in (before, after):
        if not run.is_dir():
            raise BratsError(f"{run}: no such run folder: give two run folders made by train.py")
    check_same_folds(before, after)
    runs = {"before": load_run(before), "after": load_run(after)}
    lines = [
        "# Ablation: before (--policy baseline, RECIPE.md 1) vs after (--policy final, RECIPE.md 6), "
        "same folds",
        "",
        f"- before: `{before}` (policy {runs['before']['config']['policy']})",
        f"- after: `{after}` (policy {runs['after']['config']['policy']})",
        "",
        "| Fold | AUC before | AUC after | F1 (macro) before | F1 (macro) after | Acc. before | Acc. after |",
        "|------|-----------|-----------|-------------------|------------------|-------------|------------|",
    ]
    fa = {r.fold: r.metrics for r in runs["before"]["summary"].folds}
    fb = {r.fold: r.metrics for r in runs["after"]["summary"].folds}
    for k in sorted(set(fa) & set(fb)):
        a, b = fa[k], fb[k]
        lines.append(
            f"| {k} | {a['auc']:.4f} | {b['auc']:.4f} | {a['macro_f1']:.4f} | {b['macro_f1']:.4f} | "
            f"{a['accuracy']:.4f} | {b['accuracy']:.4f} |"
        )
    ma, mb = runs["before"]["summary"].mean_std, runs["after"]["summary"].mean_std
    cells = [
        f"{m[k]['mean']:.4f} +- {m[k]['std']:.4f}" for k in ("auc", "macro_f1", "accuracy") for m in (ma, mb)
    ]
    lines.append("| mean +- std | " + " | ".join(cells) + " |")
    pooled = [runs[r]["summary"].pooled.get("auc", float("nan")) for r in ("before", "after")]
    lines += ["", f"Pooled out-of-fold AUC: before {pooled[0]:.4f}, after {pooled[1]:.4f}."]
    lines += [
        "",
        "Training stability (RECIPE.md 2), per fold: std of val AUC over epochs; "
        "min / max training loss (each policy's own loss: LDAM's is scaled by s, so compare its spread "
        "within a policy); epochs run.",
        "",
        "| Fold | val AUC std before | after | train loss min-max before | after | epochs before | after |",
        "|------|--------------------|-------|---------------------------|-------|---------------|-------|",
    ]
    sa = {s["fold"]: s for s in runs["before"]["stability"]}
    sb = {s["fold"]: s for s in runs["after"]["stability"]}
    for k in sorted(set(sa) & set(sb)):
        a, b = sa[k], sb[k]
        lines.append(
            f"| {k} | {a['val_auc_std']:.4f} | {b['val_auc_std']:.4f} | "
            f"{a['train_loss_min']:.4g}-{a['train_loss_max']:.4g} | "
            f"{b['train_loss_min']:.4g}-{b['train_loss_max']:.4g} | {a['epochs']} | {b['epochs']} |"
        )
    return "\n".join(lines) + "\n"
