"""The best checkpoint of a fold: the one owner of best.pt and best_ema.pt and the rule that replaces them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from brats.evaluation.plots import save_plots
from brats.runs.checkpoint import Checkpoint, save_atomic

# A new best must beat the old one by more than float noise: the same ranking can give AUCs that
# differ in the last bits, which must not count as an improvement.
AUC_EPS = 1e-9


class BestKeeper:
    """One best checkpoint file: replaced only when the validation AUC beats the best so far by
    more than `AUC_EPS` (NaN never does), or ties it at a lower validation loss; written
    atomically. `plot` draws the ROC, PR and confusion plots of the best epoch once the fold is
    done (drawing them at every new best cost ~0.5 s each time, for plots the next replaced).

    `consider` runs on every process (so that all agree on early stopping); `save` and `plot`
    write, on the main process only. The best AUC and epoch, and the labels and probabilities
    the plots are drawn from, are part of the resume state.
    """

    def __init__(self, path: Path, is_ema: bool, title: str, last: bool = False):
        self.path, self.is_ema, self.title = Path(path), is_ema, title
        self.last = last  # keep every epoch in turn: the file ends with the fold's last epoch
        self.plot_prefix = "ema_" if is_ema else ""
        self.best_auc, self.best_loss, self.best_epoch = -math.inf, math.inf, 0
        self.labels: list[int] = []  # the best epoch's validation labels and p(HGG), for `plot`
        self.p_hgg: list[float] = []

    def consider(self, auc: float, epoch: int, loss: float = math.inf) -> bool:
        """Record `epoch` if it is a new best: a higher AUC, or the same AUC at a lower validation
        loss. Returns whether it is. The tie-break matters on small validation folds, whose AUC
        takes few values and often reaches 1.0 within a few epochs: without it the first epoch
        to reach the top is kept, a barely trained model whose probabilities are bunched."""
        if self.last:
            self.best_auc, self.best_loss, self.best_epoch = auc, loss, epoch
            return True
        higher = auc > self.best_auc + AUC_EPS
        tied = abs(auc - self.best_auc) <= AUC_EPS and loss < self.best_loss
        if not (higher or tied):
            return False
        self.best_auc, self.best_loss, self.best_epoch = auc, loss, epoch
        return True

    def save(self, ckpt: Checkpoint, labels: np.ndarray, p_hgg: np.ndarray) -> None:
        """Write the new best; remember what its plots are drawn from."""
        save_atomic(ckpt.to_payload(), self.path)
        self.labels, self.p_hgg = [int(v) for v in labels], [float(v) for v in p_hgg]

    def plot(self) -> None:
        """Replace earlier plots of this checkpoint with those of its best epoch."""
        if not self.labels:  # no best yet, or resumed from a state.pt written before they were kept
            return
        folder = self.path.parent
        for old in folder.glob(f"{self.plot_prefix}*_epoch_*.png"):
            if self.is_ema or not old.name.startswith("ema_"):
                old.unlink()
        suffix, title = f"_epoch_{self.best_epoch}", f"{self.title} epoch {self.best_epoch}"
        labels, p_hgg = np.asarray(self.labels), np.asarray(self.p_hgg)
        save_plots(folder, labels, p_hgg, prefix=self.plot_prefix, suffix=suffix, title=title)

    def state_dict(self) -> dict[str, Any]:
        best = {"best_auc": self.best_auc, "best_loss": self.best_loss, "best_epoch": self.best_epoch}
        return {**best, "labels": self.labels, "p_hgg": self.p_hgg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_auc = float(state.get("best_auc", -math.inf))
        # a state written before the tie-break: its best was kept on ties, so a tie keeps it now
        self.best_loss = float(state.get("best_loss", -math.inf))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.labels, self.p_hgg = list(state.get("labels", [])), list(state.get("p_hgg", []))
