"""The held-out test set (`train.py --test-fraction`): the one place where the exported
combination of fold models is scored on patients none of them trained on or chose an epoch on.

Each fold model is scored there at the decision fitted on the pooled out-of-fold predictions (the
decision a single-fold export ships). The ensemble averages the folds' p(HGG), which makes it a
different model: a calibration and threshold fitted on single-fold predictions need not transfer
to it (averaging pulls probabilities towards the middle when the folds disagree). So:

- the single-fold decision is applied to the ensemble's test predictions, to show how well it
  transfers;
- the ensemble's own decision (the same calibration method and threshold rule) is fitted on its
  test predictions, the only honest predictions it has; the figures given for it are
  cross-fitted within the test set (each test patient decided by a decision fitted on the other
  test patients), so none is measured on the patients it was fitted on. This is the decision an
  ensemble export ships.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold

from brats.deploy.contract import Decision
from brats.evaluation.calibration import decide, operating_point, probability_figures
from brats.evaluation.metrics import bootstrap_auc_ci, rank_auc

PROTOCOL = (
    "the ensemble's calibration and threshold are fitted on its own predictions for the test patients "
    "(held out of every fold: the only patients none of its models trained on or chose an epoch on); "
    "its figures are cross-fitted within the test set (each patient decided by a decision fitted on "
    "the other test patients)"
)


def model_figures(labels: np.ndarray, p: np.ndarray, decision: Decision, seed: int = 0) -> dict:
    """AUC with its CI, and at `decision`: the operating point and the calibrated probabilities'
    Brier, log loss and calibration slope and intercept."""
    lo, hi = bootstrap_auc_ci(labels, p, seed=seed)
    calibrated = decision.calibrate(p)
    figures = probability_figures(labels, calibrated)
    del figures["reliability"]
    return {
        "auc": float(rank_auc(labels[None], p[None])[0]),
        "auc_ci95": [lo, hi],
        **figures,
        "operating_point": operating_point(labels, decision.grade(calibrated)),
    }


def cross_fit_folds(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Stratified folds (up to 5, as many as the rarer grade allows) over the test patients."""
    k = int(min(5, np.bincount(labels, minlength=2).min()))
    folds = np.zeros(len(labels), dtype=int)
    if k >= 2:
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for i, (_, part) in enumerate(skf.split(np.zeros(len(labels)), labels)):
            folds[part] = i
    return folds


def score_test_set(
    ids: list[str],
    labels: np.ndarray,
    fold_p: dict[int, np.ndarray],
    oof_decision: Decision,
    calibrate: str,
    threshold: str,
    force: bool = False,
) -> tuple[dict, Decision]:
    """The test set's figures (per fold model, and the ensemble of `fold_p`'s folds with its
    own decision) and that decision."""
    labels = np.asarray(labels).astype(int)
    p_ens = np.mean(list(fold_p.values()), axis=0)
    parts = cross_fit_folds(labels)
    decision, own = decide(labels, p_ens, parts, calibrate, threshold, force)
    if len(np.unique(parts)) > 1 and own["how"].startswith("cross-fitted"):
        own["how"] = (
            f"cross-fitted: the test set in {len(np.unique(parts))} stratified parts, each decided by a "
            "decision fitted on the others"
        )
    return {
        "n": int(len(labels)),
        "hgg": int(labels.sum()),
        "lgg": int(len(labels) - labels.sum()),
        "patients": list(ids),
        "labels": [int(v) for v in labels],
        "protocol": PROTOCOL,
        "folds": {str(k): model_figures(labels, p, oof_decision) for k, p in fold_p.items()},
        "ensemble": {
            "folds": sorted(fold_p),
            "single_fold_decision": model_figures(labels, p_ens, oof_decision),
            "own_decision": own,
            "decision": decision.to_dict(),
            "p_hgg": [float(v) for v in p_ens],
        },
    }, decision
