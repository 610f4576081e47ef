"""A re-scored checkpoint against what it stored when it was saved: AUC and, patient by patient,
p(HGG) (RECIPE.md 3.5: verification that evaluation matches the checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brats.evaluation.scoring import AUTOCAST
from brats.runs.checkpoint import Checkpoint

AUC_TOLERANCE = 0.01  # RECIPE.md 3.5: warn when re-scored and stored AUC differ by more
# Per patient |p(HGG) stored - re-scored|. Validation and the re-score both run in full fp32
# (no TF32): what differs is the batch, the memory format and the kernels chosen, which move a
# probability by ~1e-7 on the CPU; 1e-4 leaves room for GPU kernels while catching any error that
# could flip a grade near the threshold.
DP_TOLERANCE = 1e-4
# Checkpoints written before validation ran in fp32 stored bf16/fp16 scores: re-scored in fp32
# (on a CPU), a patient's p(HGG) moves by up to a few 0.01 (0.2 for a dilated ResNet-50).
DP_TOLERANCE_CROSS = 0.05


def precision_name(precision: str | None) -> str:
    """accelerate's mixed-precision value as read in a report: "no" is fp32."""
    return "fp32" if precision == "no" else str(precision or "unknown")


def rescore_precision(trained: str | None, device: torch.device) -> str:
    """The forward precision of a re-score: the one training validated in when this device can
    run it (mixed precision on a GPU), else fp32 ("no")."""
    return trained if device.type == "cuda" and trained in AUTOCAST else "no"


@dataclass(frozen=True)
class Verification:
    """A re-scored checkpoint against what it stored: its val AUC and, patient by patient, the
    stored p(HGG) (checkpoints record both; older ones the AUC only)."""

    stored_auc: float
    rescored_auc: float
    trained: str  # precision of the stored figures ("no" = fp32; "unknown" in older files)
    rescored: str
    max_abs_dp: float | None  # over the patients compared; None when none is stored
    worst: str  # the patient with the largest |dp|
    compared: int

    @property
    def tolerance(self) -> float:
        """fp32 against fp32: the same computation up to kernel choice. Anything scored in a mixed
        precision (checkpoints written before validation ran in fp32): bf16 keeps 8 bits of
        mantissa, so probabilities move by up to a few 0.01, whichever precision re-scores."""
        fp32 = self.trained in ("no", "unknown") and self.rescored == "no"
        return DP_TOLERANCE if fp32 else DP_TOLERANCE_CROSS

    @property
    def ok(self) -> bool:
        auc_ok = abs(self.rescored_auc - self.stored_auc) <= AUC_TOLERANCE  # False for NaN
        return auc_ok and (self.max_abs_dp is None or self.max_abs_dp <= self.tolerance)

    @property
    def text(self) -> str:
        diff = abs(self.rescored_auc - self.stored_auc)
        verb = "matches" if diff <= AUC_TOLERANCE else "differs from"
        text = (
            f"re-scored val AUC {self.rescored_auc:.6f} {verb} the stored {self.stored_auc:.6f} "
            f"(|diff| {diff:.2e})"
        )
        if self.max_abs_dp is not None:
            text += (
                f"; per patient max |dp| {self.max_abs_dp:.2e} over {self.compared} ({self.worst}), "
                f"tolerance {self.tolerance:g}"
            )
        if self.trained != self.rescored and self.trained != "unknown":
            text += (
                f"; validated in {precision_name(self.trained)} during training, re-scored in "
                f"{precision_name(self.rescored)}"
            )
            if self.rescored == "no":
                text += " on the CPU (re-score on a GPU to compare like with like)"
        return text

    def row(self) -> dict:
        return {
            "validated_in": self.trained,
            "rescored_in": self.rescored,
            "max_abs_dp": self.max_abs_dp,
            "patients_compared": self.compared,
        }


def verify(
    ckpt: Checkpoint, rescored_p: dict[str, float], rescored_auc: float, precision: str
) -> Verification:
    """Compare a re-score with what `ckpt` stored (see `Verification`)."""
    common = [p for p in rescored_p if p in ckpt.val_probabilities]
    dps = {p: abs(float(rescored_p[p]) - float(ckpt.val_probabilities[p])) for p in common}
    worst = max(dps, key=dps.__getitem__) if dps else ""
    return Verification(
        stored_auc=ckpt.val_auc,
        rescored_auc=rescored_auc,
        trained=ckpt.mixed_precision or "unknown",
        rescored=precision,
        max_abs_dp=dps[worst] if dps else None,
        worst=worst,
        compared=len(dps),
    )
