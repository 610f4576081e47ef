"""A fold's kept checkpoints: the one owner of best.pt and best_ema.pt and the rule that replaces them.

The engine says "this epoch ended with these scored models" (`consider`, on every process, so that
all agree on early stopping) and, on the main process, "write what you keep" (`write`). The
keeper decides: with `--select best` (RECIPE.md 6.6) a file is replaced only when its model's
validation AUC beats the best so far by more than float noise, or ties it at a lower validation
loss; with `--select last` every epoch is kept, and written only when the resume state is (the
last epoch always is), so that state.pt always knows the checkpoints on disk. Files are written
atomically; the plots of the checkpoint evaluation uses are drawn once the fold is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brats import __version__
from brats.evaluation.plots import save_plots
from brats.runs.checkpoint import Checkpoint, cpu_state_dict, save_atomic
from brats.runs.paths import RunPaths

# A new best must beat the old one by more than float noise: the same ranking can give AUCs that
# differ in the last bits, which must not count as an improvement.
AUC_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One model scored on the validation patients at the end of an epoch."""

    ema: bool  # the EMA copy (kept in best_ema.pt) or the trained weights (best.pt)
    weights: torch.nn.Module  # the plain module: what a checkpoint would hold
    metrics: dict[str, Any]  # validation metrics, with "auc" and "loss"
    p_hgg: np.ndarray  # (N,) per validation patient, in FoldRecord.val_ids order


@dataclass(frozen=True, kw_only=True)
class FoldRecord:
    """What every checkpoint of one fold records beside its weights, metrics and epoch."""

    config: dict[str, Any]  # TrainConfig.to_dict()
    fold: int
    splits_fingerprint: str  # cohort fingerprint of splits.json
    patients_fingerprint: str  # who trained, chose the epoch and is scored (folds.Fold.fingerprint)
    protocol: str  # how the epoch is chosen (brats.data.folds.protocol)
    val_patients: list[str]  # the patients that choose the epoch (sorted)
    preprocess: dict[str, Any]  # the cache's preprocessing contract
    mixed_precision: str  # forward precision of the validation ("no" = fp32)
    val_ids: list[str]  # the validation patients in the validation loader's order
    val_labels: np.ndarray  # (N,) their labels, same order


class Best:
    """One kept file (best.pt or best_ema.pt): its best AUC, loss and epoch so far and the
    validation labels and p(HGG) its plots are drawn from. Part of the resume state."""

    def __init__(self, path: Path, is_ema: bool, title: str):
        self.path, self.is_ema, self.title = Path(path), is_ema, title
        self.best_auc, self.best_loss, self.best_epoch = -math.inf, math.inf, 0
        self.labels: list[int] = []
        self.p_hgg: list[float] = []

    def beats(self, auc: float, loss: float) -> bool:
        """A higher AUC, or the same AUC at a lower validation loss (NaN never beats). The tie-break
        matters on small validation folds, whose AUC takes few values and often reaches 1.0 within
        a few epochs: without it the first epoch to reach the top is kept, a barely trained model
        whose probabilities are bunched."""
        higher = auc > self.best_auc + AUC_EPS
        tied = abs(auc - self.best_auc) <= AUC_EPS and loss < self.best_loss
        return higher or tied

    def state_dict(self) -> dict[str, Any]:
        best = {"best_auc": self.best_auc, "best_loss": self.best_loss, "best_epoch": self.best_epoch}
        return {**best, "labels": self.labels, "p_hgg": self.p_hgg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"a {type(state).__name__}, not a mapping")
        auc = float(state.get("best_auc", -math.inf))
        if not (auc == -math.inf or 0.0 <= auc <= 1.0):
            raise ValueError(f"best AUC {auc}")
        self.best_auc = auc
        # a state written before the tie-break: its best was kept on ties, so a tie keeps it now
        self.best_loss = float(state.get("best_loss", -math.inf))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.labels, self.p_hgg = list(state.get("labels", [])), list(state.get("p_hgg", []))

    def plot(self) -> None:
        """Replace earlier plots of this file with those of its kept epoch."""
        if not self.labels:  # nothing kept yet, or resumed from a state.pt written before they were
            return
        prefix = "ema_" if self.is_ema else ""
        for old in self.path.parent.glob(f"{prefix}*_epoch_*.png"):
            if self.is_ema or not old.name.startswith("ema_"):
                old.unlink()
        save_plots(
            self.path.parent,
            np.asarray(self.labels),
            np.asarray(self.p_hgg),
            prefix=prefix,
            suffix=f"_epoch_{self.best_epoch}",
            title=f"{self.title} epoch {self.best_epoch}",
        )


class CheckpointKeeper:
    """best.pt (and best_ema.pt with EMA) of one fold, by the selection policy `select`."""

    def __init__(self, *, paths: RunPaths, record: FoldRecord, select: str, ema: bool):
        k = record.fold
        self.record, self.last = record, select == "last"
        self.bests = {"best": Best(paths.best(k), False, f"fold {k}")}
        if ema:
            self.bests["best_ema"] = Best(paths.best(k, ema=True), True, f"fold {k} EMA")
        self._pending: list[tuple[Best, Candidate]] = []

    @property
    def policy(self) -> Best:
        """The file the selection policy evaluates (best_ema.pt when EMA is on, else best.pt):
        patience counts its improvements only, so that training does not go on for epochs in
        which only the other model improved, nor stop while the evaluated one still does."""
        return self.bests.get("best_ema") or self.bests["best"]

    def consider(self, epoch: int, candidates: list[Candidate]) -> bool:
        """Record which candidates are kept at `epoch`; returns whether the policy's file was."""
        self._pending = []
        for c in candidates:
            best = self.bests["best_ema" if c.ema else "best"]
            auc, loss = float(c.metrics["auc"]), float(c.metrics["loss"])
            if self.last or best.beats(auc, loss):
                best.best_auc, best.best_loss, best.best_epoch = auc, loss, epoch
                self._pending.append((best, c))
        return any(best is self.policy for best, _ in self._pending)

    def write(self, epoch: int, due: bool) -> list[Path]:
        """Write the checkpoints kept at `epoch` (main process); with --select last, only when the
        resume state is `due` too. Returns the files written."""
        if self.last and not due:
            return []
        written = []
        for best, c in self._pending:
            r = self.record
            ckpt = Checkpoint(
                model_state_dict=cpu_state_dict(c.weights),
                val_metrics=c.metrics,
                epoch=epoch,
                is_ema=best.is_ema,
                config=r.config,
                fold=r.fold,
                splits_fingerprint=r.splits_fingerprint,
                patients_fingerprint=r.patients_fingerprint,
                protocol=r.protocol,
                val_patients=r.val_patients,
                preprocess=r.preprocess,
                brats_version=__version__,
                mixed_precision=r.mixed_precision,
                val_probabilities=dict(zip(r.val_ids, map(float, c.p_hgg), strict=True)),
            )
            save_atomic(ckpt.to_payload(), best.path)
            best.labels = [int(v) for v in r.val_labels]
            best.p_hgg = [float(v) for v in c.p_hgg]
            written.append(best.path)
        self._pending = []
        return written

    def plot(self) -> None:
        """The ROC, PR and confusion plots of the checkpoint evaluation uses (main process, at the
        fold's end, not at every new best: each drawing costs more than a small fold's epoch)."""
        self.policy.plot()

    def outcome(self) -> dict[str, Any]:
        """The kept epochs and AUCs, for the fold's summary."""
        best, ema = self.bests["best"], self.bests.get("best_ema")
        return {
            "best_epoch": best.best_epoch,
            "best_auc": best.best_auc,
            "best_ema_epoch": ema.best_epoch if ema else None,
            "best_ema_auc": ema.best_auc if ema else None,
        }
