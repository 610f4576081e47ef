"""Classification metrics (HGG = 1 is the positive class), as the training report gives them
(RECIPE.md 4).

Everything is computed by scikit-learn on the full arrays of one validation set.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

METRICS = ("auc", "f1", "macro_f1", "accuracy", "balanced_accuracy", "precision", "recall")


def classification_metrics(labels: np.ndarray, p_hgg: np.ndarray, threshold: float = 0.5) -> dict:
    """labels (N,) in {0, 1}, p_hgg (N,) in [0, 1] -> dict of METRICS plus the confusion matrix.

    AUC is NaN when the set holds one class only.
    """
    labels = np.asarray(labels).astype(int)
    p_hgg = np.asarray(p_hgg, dtype=np.float64)
    pred = (p_hgg >= threshold).astype(int)
    both = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, p_hgg)) if both else math.nan,
        "f1": float(f1_score(labels, pred, pos_label=1, zero_division=0)),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=[0, 1], zero_division=0)),
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if both else math.nan,
        "precision": float(precision_score(labels, pred, pos_label=1, zero_division=0)),
        "recall": float(recall_score(labels, pred, pos_label=1, zero_division=0)),
        "confusion_matrix": confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
        "n": int(len(labels)),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) across folds: the report's 'mean +- std'."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row of (R, N) arrays by the Mann-Whitney rank formula (ties get mean ranks)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    return ((ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_auc_ci(
    labels: np.ndarray, p_hgg: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% CI of the AUC over patient resamples, stratified by class (seeded)."""
    labels = np.asarray(labels).astype(int)
    p_hgg = np.asarray(p_hgg, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    idx = np.concatenate([rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1)
    aucs = rank_auc(labels[idx], p_hgg[idx])
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)
