"""The model's own doubt about one patient, from the graph's doubt outputs and the thresholds the
model carries (measured on the cohort at export: brats.evaluation.doubt).

- Out of distribution: the patient's features are farther from the training patients' than
  98% of the out-of-fold patients' were (`ood` yes, with the distance and its percentile).
- Disagreement (ensembles): the fold models' p(HGG) spread wider than 98% of the cohort's.

No torch here: predict.py runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Doubt:
    distance: float | None = None  # feature distance (about 1 for a training patient)
    percentile: float | None = None  # of the distance among the out-of-fold patients', 0-100
    ood: bool | None = None  # beyond the threshold; None: the model carries no reference
    spread: float | None = None  # max - min of the fold models' p(HGG); None: one model
    disagree: bool = False  # the spread is beyond the cohort's threshold

    @property
    def reasons(self) -> list[str]:
        said = []
        if self.ood:
            said.append(
                f"out of distribution: feature distance {self.distance:.2f}, beyond "
                f"{self.percentile:.0f}% of the out-of-fold patients'"
            )
        if self.disagree:
            said.append(f"the fold models disagree (p(HGG) spread {self.spread:.2f})")
        return said


def assess(
    fold_p: np.ndarray | None, distance: np.ndarray | None, reference: dict | None, n: int
) -> list[Doubt]:
    """One Doubt per patient of a batch of `n`; models without the outputs or the reference
    (exported before they existed) give empty ones."""
    if not reference:
        return [Doubt() for _ in range(n)]
    out = []
    oof = np.asarray(reference.get("oof_distances", []), dtype=np.float64)
    for j in range(n):
        d = p = ood = spread = None
        disagree = False
        if distance is not None and "distance_threshold" in reference:
            d = float(distance[j])
            p = float((oof <= d).mean() * 100) if len(oof) else None
            ood = d > float(reference["distance_threshold"])
        if fold_p is not None and fold_p.shape[1] > 1 and "spread_threshold" in reference:
            spread = float(np.ptp(fold_p[j]))
            disagree = spread > float(reference["spread_threshold"])
        out.append(Doubt(distance=d, percentile=p, ood=ood, spread=spread, disagree=disagree))
    return out
