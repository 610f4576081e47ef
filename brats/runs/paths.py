"""The layout of a run folder: the one place that names its files.

RUN/
  config.json                 resolved TrainConfig shared by every fold
  splits.json                 patient-level folds (and inner validation)
  preprocess.json             the preprocessing contract of the cache the folds train on
  fold_K/                     best.pt, best_ema.pt, state.pt, status.json, metrics.csv, plots, train.log
  evaluation/                 summary.json, report.md, predictions.csv, test_predictions.csv, plots
  model.onnx | model_ensemble.onnx (+ <stem>_card.json beside each)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from brats.deploy.contract import card_path

BEST = "best.pt"
BEST_EMA = "best_ema.pt"
STATE = "state.pt"  # resume state: never used for evaluation
_FOLD = re.compile(r"fold_(\d+)")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def preprocess(self) -> Path:
        """The preprocessing contract of the cache every fold of the run trains on."""
        return self.root / "preprocess.json"

    @staticmethod
    def fold_name(k: int) -> str:
        """fold_K: a fold's folder in the run, and its plots' folder in evaluation/."""
        return f"fold_{k}"

    def fold(self, k: int) -> Path:
        return self.root / self.fold_name(k)

    def best(self, k: int, ema: bool = False) -> Path:
        return self.fold(k) / (BEST_EMA if ema else BEST)

    def state(self, k: int) -> Path:
        return self.fold(k) / STATE

    def status(self, k: int) -> Path:
        """How far fold k got (epochs, finished or not), written with each resume state."""
        return self.fold(k) / "status.json"

    def metrics(self, k: int) -> Path:
        return self.fold(k) / "metrics.csv"

    def log(self, k: int) -> Path:
        return self.fold(k) / "train.log"

    def folds(self) -> list[int]:
        """Indices of the fold folders present, ascending."""
        if not self.root.is_dir():
            return []
        found = (_FOLD.fullmatch(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def trained(self, k_total: int) -> list[int]:
        """The folds (of 0..k_total-1) that hold a checkpoint evaluation can choose (a fold still
        in its first epoch has none yet)."""
        return [
            k
            for k in self.folds()
            if k < k_total and (self.best(k).is_file() or self.best(k, ema=True).is_file())
        ]

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def summary(self) -> Path:
        return self.evaluation / "summary.json"

    @property
    def report(self) -> Path:
        return self.evaluation / "report.md"

    @property
    def predictions(self) -> Path:
        return self.evaluation / "predictions.csv"

    @property
    def test_predictions(self) -> Path:
        """Each fold model's and the ensemble's p(HGG) on the held-out test set (runs with one)."""
        return self.evaluation / "test_predictions.csv"

    @property
    def roc_all_folds(self) -> Path:
        return self.evaluation / "roc_all_folds.png"

    def cam_montage(self, k: int) -> Path:
        """Fold k's most confident right and wrong patients with their CAM (evaluate.py --cam)."""
        return self.evaluation / self.fold_name(k) / "cam_montage.png"

    def model(self, ensemble: bool = False) -> Path:
        return self.root / ("model_ensemble.onnx" if ensemble else "model.onnx")

    @staticmethod
    def card(model_path: str | Path) -> Path:
        """model.onnx -> model_card.json beside it."""
        return card_path(model_path)
