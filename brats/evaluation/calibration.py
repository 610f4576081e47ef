"""Calibrated p(HGG) and the decision threshold, both fitted on pooled out-of-fold predictions.

Training draws HGG and LGG patients equally often (the inverse-frequency sampler), so a model's raw
p(HGG) reflects a 50/50 prior, not the cohort's ~74% HGG: raw probabilities are not frequencies.
`--calibrate platt` (p' = sigmoid(a z + b), z the logit of p(HGG)) refits both the prior (b) and
the confidence (a); `temperature` (p' = sigmoid(z / T)) the confidence only. Both are fitted on the
out-of-fold predictions, where every patient was scored by a model that
never trained on them. The threshold is chosen there too: 0.5 (the report's), a fixed value,
Youden's J (max sensitivity + specificity - 1) or a target sensitivity.

`Decision` holds both and travels in the exported model's contract; applying it needs numpy only
(predict.py runs without torch). Figures of a fitted decision are cross-fitted: each fold's
patients are calibrated and thresholded by a decision fitted on the other folds only.
"""

from __future__ import annotations

import math

import numpy as np

from brats.deploy.contract import _EPS, CALIBRATIONS, Decision, logit, parse_rule
from brats.errors import BratsError

METHODS = CALIBRATIONS
BINS = 10  # equal-width probability bins of the reliability diagram and the ECE


def fit_calibration(labels: np.ndarray, p_hgg: np.ndarray, method: str) -> tuple[float, float]:
    """(slope, intercept) minimising the log loss of sigmoid(slope * logit(p) + intercept) on
    these patients; temperature scaling fits the slope only."""
    if method not in METHODS:
        raise BratsError(f"--calibrate {method!r}: choose one of {', '.join(METHODS)}")
    if method == "none":
        return 1.0, 0.0
    from scipy.optimize import minimize

    y = np.asarray(labels, dtype=np.float64)
    z = logit(p_hgg)

    # The slope is fitted as its log: calibration may soften or sharpen the model's ranking but
    # never reverse it (a reversed ranking is a broken model, not a miscalibrated one).
    def unpack(params: np.ndarray) -> tuple[float, float]:
        a = float(np.exp(np.clip(params[0], -20.0, 20.0)))
        return (a, 0.0) if method == "temperature" else (a, float(params[1]))

    def loss(params: np.ndarray) -> float:
        a, b = unpack(params)
        s = a * z + b
        return float(np.mean(np.logaddexp(0.0, s) - y * s))  # binary cross-entropy on logits

    start = np.array([0.0] if method == "temperature" else [0.0, 0.0])
    res = minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-12})
    return unpack(res.x)


def choose_threshold(labels: np.ndarray, p: np.ndarray, rule: str) -> float:
    """The threshold `rule` asks for on these (calibrated) probabilities. A data-driven threshold
    lies halfway between the score that achieves the rule and the next lower one, so that new
    patients near it are not decided by one training patient's exact score."""
    kind, value = parse_rule(rule)
    if kind == "fixed":
        return value
    labels, p = np.asarray(labels).astype(int), np.asarray(p, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        raise BratsError(f"--threshold {rule}: needs patients of both grades")
    scores = np.unique(p)[::-1]  # candidate thresholds, high to low
    tpr = np.array([(p[labels == 1] >= t).mean() for t in scores])
    fpr = np.array([(p[labels == 0] >= t).mean() for t in scores])
    if kind == "youden":
        i = int(np.argmax(tpr - fpr))  # the first (highest) threshold of the best J
    else:
        i = int(np.argmax(tpr >= value - 1e-12))  # the highest threshold reaching the sensitivity
    lower = scores[i + 1] if i + 1 < len(scores) else 0.0
    # kept inside (0, 1): a threshold of exactly 0 or 1 would grade every new patient alike
    return float(np.clip((scores[i] + lower) / 2, _EPS, 1 - _EPS))


def fit_decision(labels: np.ndarray, p_hgg: np.ndarray, method: str, rule: str) -> Decision:
    slope, intercept = fit_calibration(labels, p_hgg, method)
    dec = Decision(method, slope, intercept, 0.5, str(rule))
    return Decision(method, slope, intercept, choose_threshold(labels, dec.calibrate(p_hgg), rule), str(rule))


def brier(labels: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(labels)) ** 2))


def log_loss(labels: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood of the grades (probabilities kept inside (0, 1))."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# A calibration slope above this sharpens the model's logits more than tenfold: fitted on
# (nearly) separated grades, it turns p = 0.49-0.51 into 0 and 1. Such a fit is refused.
CALIBRATION_SLOPE_MAX = 10.0
SLOPE_CAP = 100.0  # a larger fitted slope means the grades are (nearly) separated: reported as this


def _logistic(z: np.ndarray, y: np.ndarray, with_slope: bool) -> tuple[float, float]:
    """Maximum-likelihood fit of P(HGG) = sigmoid(a z + b) (a fixed at 1 without `with_slope`)
    by Newton's method with step halving (each step must raise the likelihood); returns (a, b).
    When the grades are (nearly) separated the likelihood keeps rising with |a|: the fit stops
    at SLOPE_CAP."""

    def loglik(a: float, b: float) -> float:
        s = a * z + b
        return float(np.sum(y * s - np.logaddexp(0.0, s)))

    a, b = 1.0, 0.0
    current = loglik(a, b)
    for _ in range(100):
        q = 1 / (1 + np.exp(-np.clip(a * z + b, -500, 500)))
        w = np.maximum(q * (1 - q), 1e-12)
        if with_slope:
            grad = np.array([np.sum((y - q) * z), np.sum(y - q)])
            hess = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
            step = np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
        else:
            step = np.array([0.0, np.sum(y - q) / np.sum(w)])
        for _ in range(30):
            trial = loglik(a + step[0], b + step[1])
            if trial >= current:
                break
            step = step / 2
        else:
            break  # no step raises the likelihood: at the optimum to machine precision
        a, b, current = a + step[0], b + step[1], trial
        if abs(a) >= SLOPE_CAP:
            return float(np.sign(a) * SLOPE_CAP), float(b)
        if np.max(np.abs(step)) < 1e-9:
            break
    return float(a), float(b)


def calibration_line(labels: np.ndarray, p: np.ndarray, n_boot: int = 500, seed: int = 0) -> dict:
    """The calibration slope (a of P(HGG) = sigmoid(a logit(p) + b): 1 when the probabilities
    are as confident as they should be, above 1 underconfident, below 1 overconfident) and the
    calibration intercept (b with a fixed at 1, calibration-in-the-large: 0 when the mean p(HGG)
    matches the share of HGG), each with a percentile 95% CI over patient resamples (stratified,
    seeded). ECE alone cannot tell a calibrated model from an uncalibrated one on a few hundred
    patients; these two name the direction and come with their uncertainty."""
    y = np.asarray(labels).astype(np.float64)
    z = logit(p)
    slope, _ = _logistic(z, y, True)
    _, intercept = _logistic(z, y, False)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    slopes, intercepts = [], []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        slopes.append(_logistic(z[idx], y[idx], True)[0])
        intercepts.append(_logistic(z[idx], y[idx], False)[1])
    return {
        "slope": slope,
        "slope_ci95": [float(v) for v in np.percentile(slopes, [2.5, 97.5])],
        "intercept": intercept,
        "intercept_ci95": [float(v) for v in np.percentile(intercepts, [2.5, 97.5])],
    }


def reliability(labels: np.ndarray, p: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per non-empty equal-width bin: its range, patients, mean p(HGG) and fraction HGG."""
    labels, p = np.asarray(labels, dtype=np.float64), np.asarray(p, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return [
        {
            "lo": b / bins,
            "hi": (b + 1) / bins,
            "n": int((which == b).sum()),
            "mean_p": float(p[which == b].mean()),
            "fraction_hgg": float(labels[which == b].mean()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def ece(labels: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the patient-weighted mean |fraction HGG - mean p| over bins."""
    rows = reliability(labels, p, bins)
    n = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["fraction_hgg"] - r["mean_p"]) for r in rows) / max(n, 1))


def operating_point(labels: np.ndarray, grade: np.ndarray) -> dict:
    labels, grade = np.asarray(labels).astype(int), np.asarray(grade).astype(int)
    sens = float((grade[labels == 1] == 1).mean()) if (labels == 1).any() else math.nan
    spec = float((grade[labels == 0] == 0).mean()) if (labels == 0).any() else math.nan
    return {
        "accuracy": float((grade == labels).mean()),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2,
    }


def cross_fit(
    labels: np.ndarray, p_hgg: np.ndarray, folds: np.ndarray, method: str, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated p, grade) of each patient by a decision fitted on the other folds' patients."""
    p_cal, grade = np.empty(len(p_hgg)), np.empty(len(p_hgg), dtype=int)
    for k in np.unique(folds):
        out = folds == k
        dec = fit_decision(labels[~out], p_hgg[~out], method, rule)
        p_cal[out] = dec.calibrate(p_hgg[out])
        grade[out] = dec.grade(p_cal[out])
    return p_cal, grade


def summarize_calibration(
    labels: np.ndarray, p_hgg: np.ndarray, folds: np.ndarray, method: str, rule: str
) -> tuple[Decision, dict]:
    """The decision fitted on all out-of-fold predictions and the figures that judge it: Brier,
    ECE and reliability bins of the raw probabilities and (cross-fitted) of the calibrated ones,
    and the operating point at the threshold (cross-fitted when the threshold is fitted)."""
    labels, p_hgg, folds = (
        np.asarray(labels).astype(int),
        np.asarray(p_hgg, dtype=np.float64),
        np.asarray(folds),
    )
    decision = fit_decision(labels, p_hgg, method, rule)
    fitted = method != "none" or parse_rule(rule)[0] != "fixed"
    several = len(np.unique(folds)) > 1 and all(
        len(np.unique(labels[folds != k])) == 2 for k in np.unique(folds)
    )
    if fitted and several:
        p_cal, grade = cross_fit(labels, p_hgg, folds, method, rule)
        how = "cross-fitted: each fold calibrated and thresholded by a decision fitted on the other folds"
    else:
        p_cal = decision.calibrate(p_hgg)
        grade = decision.grade(p_cal)
        how = "fitted and scored on the same patients" if fitted else "nothing fitted"
    figures = {
        "bins": BINS,
        "raw": probability_figures(labels, p_hgg),
        "operating_point": operating_point(labels, grade),
        "how": how,
    }
    if method != "none":
        raw, cal = figures["raw"], probability_figures(labels, p_cal)
        figures["calibrated"] = cal
        # judged on the cross-fitted probabilities: a calibration fitted and scored on the same
        # patients always looks better
        figures["improves"] = bool(cal["brier"] <= raw["brier"] and cal["log_loss"] <= raw["log_loss"])
    return decision, figures


def probability_figures(labels: np.ndarray, p: np.ndarray) -> dict:
    """How good these probabilities are as probabilities: Brier, log loss, ECE with its bins,
    and the calibration slope and intercept with their CIs."""
    return {
        "brier": brier(labels, p),
        "log_loss": log_loss(labels, p),
        "ece": ece(labels, p),
        "reliability": reliability(labels, p),
        **(calibration_line(labels, p) if len(np.unique(labels)) == 2 else {}),
    }


def decide(
    labels: np.ndarray, p_hgg: np.ndarray, folds: np.ndarray, method: str, rule: str, force: bool = False
) -> tuple[Decision, dict]:
    """`summarize_calibration`, keeping a calibration only where it earns its place: when its
    cross-fitted Brier score or log loss is worse than the raw probabilities', the decision is
    fitted without it (and the figures say what it would have done) unless `force`."""
    decision, figures = summarize_calibration(labels, p_hgg, folds, method, rule)
    sane = decision.slope <= CALIBRATION_SLOPE_MAX
    if method == "none" or (figures["improves"] and sane):
        return decision, figures
    if force and sane:
        figures["forced"] = True
        return decision, figures
    tried = {key: figures["calibrated"][key] for key in ("brier", "log_loss", "ece", "reliability")}
    slope = decision.slope
    decision, figures = summarize_calibration(labels, p_hgg, folds, "none", rule)
    figures["not_shipped"] = {"method": method, "cross_fitted": tried, "slope": slope}
    if not sane:
        figures["not_shipped"]["reason"] = (
            f"its slope {slope:.4g} is beyond {CALIBRATION_SLOPE_MAX:g}: it would turn p(HGG) near the "
            "threshold into 0 or 1 (the grades are separated on these few patients, or nearly)"
        )
    return decision, figures
