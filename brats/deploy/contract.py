"""What an exported model promises: its graph's inputs and outputs, the metadata keys that carry
its preprocessing contract and provenance, and the decision that turns p(HGG) into a grade.

Export writes these and predict reads them; both name them from here. Applying a decision
needs numpy only.

No torch here: predict.py runs without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from brats.data.preprocess import PreprocessConfig
from brats.errors import BratsError

# ONNX metadata keys: the preprocessing contract (PreprocessConfig.to_contract() plus the decision)
# and where the model came from.
CONTRACT_KEY, PROVENANCE_KEY = "brats_contract", "brats_provenance"
INPUT_NAME = "input"  # float32 (B, C, S, S, S), channels in the contract's `modalities` order
CAM_OUTPUT = "cam"  # the class activation map; absent from models exported before it existed
FOLDS_OUTPUT, DISTANCE_OUTPUT = "fold_p_hgg", "feature_distance"  # the model's doubt; absent before
# What each output of the graph is, in order (also written into the provenance and model card).
OUTPUTS = {
    "probabilities": "(B, 2) [p_LGG, p_HGG]",
    "logits": "(B, 2)",
    CAM_OUTPUT: (
        "(B, S, S, S) class activation map on the input cube: HGG evidence (logit_HGG - logit_LGG) "
        "per voxel, > 0 toward HGG; predict.py --cam maps it onto the patient's scan"
    ),
    FOLDS_OUTPUT: "(B, M) each fold model's p(HGG): their spread is the ensemble's disagreement",
    DISTANCE_OUTPUT: (
        "(B,) distance of the patient's pooled features to the training patients' (the mean over the "
        "fold models, each to its own training patients; about 1 for a training patient)"
    ),
}
OUTPUT_NAMES = tuple(OUTPUTS)
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
CALIBRATIONS = ("none", "temperature", "platt")
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before taking logits


def card_path(model: str | Path, suffix: str = ".json") -> Path:
    """model.onnx -> model_card.json (or model_card.md) beside it: the model card export writes."""
    p = Path(model)
    return p.with_name(f"{p.stem}_card{suffix}")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))  # no overflow for large |z|


def parse_rule(rule: str) -> tuple[str, float]:
    """--threshold: "0.5" or any number in (0, 1) (fixed), "youden", or "sensitivity:0.9"."""
    text = str(rule).strip().lower()
    if text == "youden":
        return "youden", math.nan
    kind, _, value = text.partition(":") if ":" in text else ("fixed", "", text)
    if kind in ("fixed", "sensitivity"):
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if 0.0 < v < 1.0:
            return kind, v
    raise BratsError(
        f"--threshold {rule!r}: give a probability in (0, 1) such as 0.5, youden, or a target "
        "sensitivity such as sensitivity:0.9"
    )


@dataclass(frozen=True)
class Decision:
    """How a model's p(HGG) becomes a grade: p' = sigmoid(slope * logit(p) + intercept) (identity
    for calibration "none"), then HGG when p' >= threshold."""

    calibration: str = "none"  # none | temperature | platt
    slope: float = 1.0  # temperature: 1 / T
    intercept: float = 0.0  # 0 for temperature
    threshold: float = 0.5
    rule: str = "0.5"  # how the threshold was chosen (see parse_rule)

    def calibrate(self, p_hgg: np.ndarray) -> np.ndarray:
        p_hgg = np.asarray(p_hgg, dtype=np.float64)
        if self.calibration == "none":
            return p_hgg
        return sigmoid(self.slope * logit(p_hgg) + self.intercept)

    def grade(self, p_calibrated: np.ndarray) -> np.ndarray:
        """1 (HGG) where the calibrated probability reaches the threshold."""
        return (np.asarray(p_calibrated) >= self.threshold).astype(int)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(
        cls, d: object, source: str | Path, fix: str = "export the model again with python export.py"
    ) -> Decision:
        """A stored decision, checked; `source` names the file and `fix` ends the one-line error."""
        if not isinstance(d, dict):
            raise BratsError(f"{source}: its decision is a {type(d).__name__}, not a mapping: {fix}")
        try:
            dec = cls(
                calibration=str(d.get("calibration", "none")),
                slope=float(d.get("slope", 1.0)),
                intercept=float(d.get("intercept", 0.0)),
                threshold=float(d.get("threshold", 0.5)),
                rule=str(d.get("rule", "0.5")),
            )
        except (TypeError, ValueError) as e:
            raise BratsError(f"{source}: its decision holds a non-number ({e}): {fix}") from e
        problem = dec.problem()
        if problem:
            raise BratsError(f"{source}: its decision is not one evaluate.py fits ({problem}): {fix}")
        return dec

    def problem(self) -> str:
        """What makes this decision impossible for evaluate.py to have fitted ("" when nothing): a
        threshold of 0 or 1, or a slope of 0, would grade every patient alike."""
        if self.calibration not in CALIBRATIONS:
            return f"calibration {self.calibration!r}"
        if not all(math.isfinite(v) for v in (self.slope, self.intercept, self.threshold)):
            return "a value that is not finite"
        if not 0.0 < self.threshold < 1.0:
            return f"threshold {self.threshold}, not strictly between 0 and 1"
        if self.slope <= 0:
            return f"calibration slope {self.slope}, not positive"
        if self.calibration == "none" and (self.slope, self.intercept) != (1.0, 0.0):
            return f"slope {self.slope} and intercept {self.intercept} without a calibration"
        if self.calibration == "temperature" and self.intercept != 0.0:
            return f"intercept {self.intercept} for a temperature"
        try:
            kind, value = parse_rule(self.rule)
        except BratsError:
            return f"threshold rule {self.rule!r}"
        if kind == "fixed" and abs(value - self.threshold) > 1e-9:
            return f"threshold {self.threshold} where its rule fixes {value}"
        return ""


def check_graph_input(shape: list, cfg: PreprocessConfig, model: str | Path, fix: str) -> None:
    """The graph's input must take what the contract's preprocessing produces: (B, C, S, S, S)
    with C = len(modalities) and S = size; a dynamic axis (a name or None) takes any length."""
    want = (len(cfg.modalities), cfg.size, cfg.size, cfg.size)
    fits = len(shape) == 5 and all(not isinstance(g, int) or g == w for g, w in zip(shape[1:], want))
    if not fits:
        got = ", ".join(str(d) if isinstance(d, int) else "B" for d in shape)
        raise BratsError(
            f"{model}: its graph takes input ({got}) but its preprocessing contract gives "
            f"(B, {', '.join(map(str, want))}) ({cfg.size}^3, {','.join(cfg.modalities)}): {fix}"
        )
