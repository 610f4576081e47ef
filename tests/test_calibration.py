"""Calibration and threshold rules on pooled out-of-fold predictions (brats/calibration.py)."""

import numpy as np
import pytest

from brats.deploy.contract import Decision, sigmoid
from brats.errors import BratsError
from brats.evaluation.calibration import (
    brier,
    choose_threshold,
    ece,
    fit_calibration,
    parse_rule,
    summarize_calibration,
)


def overconfident(n: int, seed: int, temperature: float = 2.0, shift: float = 0.0):
    """Labels drawn from sigmoid(z / T + shift) but scores p = sigmoid(z): too confident by T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    y = (rng.random(n) < sigmoid(z / temperature + shift)).astype(int)
    return y, sigmoid(z)


def test_temperature_and_platt_recover_the_miscalibration():
    y, p = overconfident(20000, 0, temperature=2.0)
    slope, intercept = fit_calibration(y, p, "temperature")
    assert 1 / slope == pytest.approx(2.0, rel=0.08) and intercept == 0.0
    y, p = overconfident(20000, 1, temperature=2.0, shift=0.8)
    a, b = fit_calibration(y, p, "platt")
    assert a == pytest.approx(0.5, rel=0.08) and b == pytest.approx(0.8, abs=0.1)
    assert fit_calibration(y, p, "none") == (1.0, 0.0)


def test_calibration_lowers_brier_and_ece_on_patients_it_was_not_fitted_on():
    y, p = overconfident(3000, 2)
    folds = np.arange(3000) % 5
    decision, figures = summarize_calibration(y, p, folds, "temperature", "0.5")
    assert figures["how"].startswith("cross-fitted")
    assert figures["calibrated"]["ece"] < figures["raw"]["ece"] / 2
    assert figures["calibrated"]["brier"] < figures["raw"]["brier"]
    assert decision.threshold == 0.5 and decision.rule == "0.5"
    _, plain = summarize_calibration(y, p, folds, "none", "0.5")
    assert "calibrated" not in plain and plain["how"] == "nothing fitted"
    assert plain["operating_point"]["accuracy"] == pytest.approx(((p >= 0.5) == y).mean())


def test_brier_and_ece_by_hand():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.9, 0.2, 0.35, 0.95])
    assert brier(y, p) == pytest.approx((0.01 + 0.04 + 0.4225 + 0.0025) / 4)
    # bins: [0.2,0.3) holds 0.2 (LGG), [0.3,0.4) holds 0.35 (HGG), [0.9,1.0] holds 0.9 and 0.95 (HGG)
    assert ece(y, p) == pytest.approx((0.2 + 0.65 + 2 * (1 - 0.925)) / 4)


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    rng = np.random.default_rng(3)
    y = np.array([1] * 40 + [0] * 15)
    p = np.clip(np.where(y == 1, rng.normal(0.7, 0.15, 55), rng.normal(0.45, 0.15, 55)), 0.01, 0.99)
    t = choose_threshold(y, p, "youden")

    def j(th: float) -> float:
        return (p[y == 1] >= th).mean() - (p[y == 0] >= th).mean()

    assert j(t) == pytest.approx(max(j(s) for s in np.unique(p)))
    assert not np.isin(t, p)  # halfway between two patients' scores, not on one


def test_target_sensitivity_is_the_highest_threshold_reaching_it():
    y = np.array([1] * 10 + [0] * 10)
    p = np.r_[np.linspace(0.3, 0.95, 10), np.linspace(0.05, 0.6, 10)]
    t = choose_threshold(y, p, "sensitivity:0.9")
    assert (p[y == 1] >= t).mean() >= 0.9
    above = np.unique(p)[np.unique(p) > t]  # the patient score the rule chose, then higher ones
    assert (p[y == 1] >= above[0]).mean() >= 0.9
    assert all((p[y == 1] >= s).mean() < 0.9 for s in above[1:])


@pytest.mark.parametrize("rule", ["abc", "1.5", "0", "sensitivity:2", "sensitivity:x", ""])
def test_bad_threshold_rules_are_one_line(rule):
    with pytest.raises(BratsError, match="--threshold .*give a probability in \\(0, 1\\)"):
        parse_rule(rule)


def test_decision_round_trip_and_refusals():
    d = Decision("platt", 0.7, -0.2, 0.41, "youden")
    assert Decision.from_dict(d.to_dict(), "m.onnx") == d
    assert Decision.from_dict({}, "m.onnx") == Decision()  # models exported before: raw, 0.5
    p = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(Decision().calibrate(p), p)
    np.testing.assert_allclose(d.calibrate(p), sigmoid(0.7 * np.log(p / (1 - p)) - 0.2))
    for bad in ({"calibration": "isotonic"}, {"threshold": 1.5}, {"slope": "x"}, ["x"]):
        with pytest.raises(BratsError, match="^m.onnx: .*export the model again"):
            Decision.from_dict(bad, "m.onnx")


def test_calibration_never_reverses_the_ranking():
    y, p = overconfident(2000, 4)
    for method in ("temperature", "platt"):
        slope, _ = fit_calibration(1 - y, p, method)  # scores that rank the grades backwards
        assert 0 < slope < 0.05
