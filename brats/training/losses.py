"""Losses: the final policy's CrossEntropy (RECIPE.md 6.1) and the baseline's LDAM + DRW (RECIPE.md 1.2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from brats.training.config import TrainConfig


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss: the target logit is lowered by a class margin
    proportional to n_c^(-1/4), largest (`max_m`) for the rarest class, then scaled by `s`."""

    def __init__(self, class_counts: list[int], max_m: float = 0.2, s: float = 15.0):
        super().__init__()
        margins = 1.0 / np.sqrt(np.sqrt(np.asarray(class_counts, dtype=np.float64)))
        margins *= max_m / margins.max()
        self.register_buffer("margins", torch.tensor(margins, dtype=torch.float32))
        self.s = s
        self.weight: torch.Tensor | None = None  # set by DRW

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        margin = self.margins[target].unsqueeze(1) * F.one_hot(target, logits.shape[1])
        return F.cross_entropy(self.s * (logits - margin), target, weight=self.weight)


def drw_weights(class_counts: list[int], beta: float = 0.9999) -> torch.Tensor:
    """Deferred re-weighting: class weights from the effective number of samples, summing to C."""
    counts = np.asarray(class_counts, dtype=np.float64)
    w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    w = w / w.sum() * len(counts)
    return torch.tensor(w, dtype=torch.float32)


def make_criterion(cfg: TrainConfig, class_counts: list[int]) -> nn.Module:
    if cfg.loss == "ldam":
        return LDAMLoss(class_counts, cfg.ldam_max_m, cfg.ldam_s)
    return nn.CrossEntropyLoss()


def apply_drw(criterion: nn.Module, cfg: TrainConfig, epoch: int, class_counts: list[int]) -> bool:
    """Switch DRW weights on from `cfg.drw_start_epoch` (1-based); returns whether active."""
    active = cfg.drw_start_epoch > 0 and epoch >= cfg.drw_start_epoch and isinstance(criterion, LDAMLoss)
    if isinstance(criterion, LDAMLoss):  # moved to the loss's device once, not at every step
        criterion.weight = drw_weights(class_counts).to(criterion.margins.device) if active else None
    return active
