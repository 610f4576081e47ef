"""Input quality control at prediction: is this patient in the space the model was trained in?

The model only knows BraTS space: skull-stripped, co-registered, about 1 mm isotropic scans whose
background is exactly 0 (official BraTS 2018 files: 15-18% of their 240 x 240 x 155 voxels
non-zero, 1.3-1.6 L of brain). A scan as acquired (skull on, 5 mm slices) is still graded by the
network, with confidence: these checks say when not to trust it, each with a reason a person can
act on, from the files on disk before the model runs.

- Hard checks (`fail`; not graded unless predict.py --qc warn): the background is not exactly 0
  (not skull-stripped), slices much thicker than the training scans', a brain cut by the field
  of view.
- Soft checks (`warn`): a scan unlike the training cohort's (its profile in the model's contract):
  brain volume, extent, each modality's intensity skewness (a swapped T1 and FLAIR shows there).

No torch here: predict.py runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from brats.data.cohort import MODALITIES
from brats.data.profile import EDGE_SHARE, ScanProfile

QC_MODES = ("fail", "warn", "off")  # predict --qc: refuse fails / grade them flagged / no checks
# Skull-stripped: outside the brain every voxel is exactly 0. BraTS scans are 15-18% brain; a head
# with its skull and the scanner's noise in the air around it is mostly non-zero.
NONZERO_SHARE_MAX = 0.40
THICK_FACTOR = 2.0  # slices over this many times the training scans' largest spacing are refused
# Soft checks: a feature this far outside the training cohort's 1st-99th percentile range, in
# units of that range, is unlike the training patients (a small pad: a cohort of a few dozen
# patients does not show its whole range)
SOFT_PAD = 0.25


@dataclass(frozen=True)
class QCResult:
    status: str  # pass | warn | fail | off (not checked)
    reasons: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "; ".join(self.reasons)


def hard_checks(p: ScanProfile, reference: dict | None, cube_voxel_mm: float) -> list[str]:
    """What no BraTS-space input does. `reference` is the model's cohort profile (None for models
    exported before it existed: the model's own voxel size bounds the slices then)."""
    reasons = []
    if p.nonzero_share > NONZERO_SHARE_MAX:
        reasons.append(
            f"not skull-stripped: {p.nonzero_share:.0%} of the field of view is non-zero (skull-stripped "
            "BraTS scans: 15-18%, background exactly 0): run BraTS preprocessing first (e.g. the BraTS "
            "Toolkit or BrainLes preprocessing: co-registration, 1 mm resampling, skull stripping)"
        )
    trained = reference["features"]["spacing_max_mm"]["max"] if reference else cube_voxel_mm
    if p.spacing_max_mm > THICK_FACTOR * trained:
        reasons.append(
            f"slices of {p.spacing_max_mm:.3g} mm, much coarser than the {trained:.3g} mm the model was "
            "trained on: resample the scans to BraTS space (1 mm isotropic) first"
        )
    # a brain cut by the field of view covers much of a face; training scans may touch one a little.
    # Without skull stripping "brain" is the whole head, so only the first reason is said then.
    touched = (
        reference["features"]["edge_share"]["max"]
        if reference and "edge_share" in reference["features"]
        else 0
    )
    if p.nonzero_share <= NONZERO_SHARE_MAX and p.edge_share > max(EDGE_SHARE, 2 * touched):
        reasons.append(
            f"the brain is cut by the field of view ({p.edge_share:.0%} of a face of the volume is brain): "
            "use scans that cover the whole brain"
        )
    return reasons


def _outside(value: float, f: dict) -> bool:
    pad = SOFT_PAD * max(f["q99"] - f["q01"], 1e-9)
    return not f["q01"] - pad <= value <= f["q99"] + pad


def soft_checks(p: ScanProfile, reference: dict) -> list[str]:
    """Features outside what the training cohort showed."""
    features = reference["features"]
    reasons = []
    f = features["brain_ml"]
    if _outside(p.brain_ml, f):
        seen = f"{f['q01']:.0f}-{f['q99']:.0f} mL"
        reasons.append(f"brain volume {p.brain_ml:.0f} mL, unlike the training patients' {seen}")
    for axis, extent in zip("xyz", p.extent_mm):
        f = features[f"extent_{axis}_mm"]
        if _outside(extent, f):
            reasons.append(
                f"brain extent {extent:.0f} mm along {axis}, unlike the training patients' "
                f"{f['q01']:.0f}-{f['q99']:.0f} mm"
            )
    for mod in MODALITIES:
        f = features[f"skewness_{mod}"]
        value = p.skewness[mod]
        if not _outside(value, f):
            continue
        like = [m for m in MODALITIES if m != mod and not _outside(value, features[f"skewness_{m}"])]
        hint = f": it looks like a {' or '.join(like)} (are two modalities swapped?)" if like else ""
        reasons.append(
            f"{mod} intensities unlike the training {mod} scans (skewness {value:.2f}, training "
            f"{f['q01']:.2f} to {f['q99']:.2f}){hint}"
        )
    return reasons


def check_scan(p: ScanProfile, reference: dict | None, cube_voxel_mm: float) -> QCResult:
    """pass, warn (unlike the training cohort) or fail (not BraTS space), with the reasons."""
    hard = hard_checks(p, reference, cube_voxel_mm)
    # on a scan with its skull on, "brain" is the whole head: its volume, extent and skewness say nothing more
    stripped = p.nonzero_share <= NONZERO_SHARE_MAX
    soft = soft_checks(p, reference) if reference and stripped else []
    if hard:
        return QCResult("fail", hard + soft)
    return QCResult("warn", soft) if soft else QCResult("pass")


def describe_checks(reference: dict | None, doubt: dict | None) -> dict:
    """The checks and their thresholds, for the model card."""
    hard = {
        "skull_stripped": f"refused when over {NONZERO_SHARE_MAX:.0%} of the field of view is non-zero",
        "slices": f"refused when the largest voxel spacing is over {THICK_FACTOR:g}x the training scans'",
        "cut_by_field_of_view": (
            f"refused when the brain covers over {EDGE_SHARE:.0%} of a face of the volume (or twice the "
            "most a training scan covered)"
        ),
    }
    soft = (
        f"warned when brain volume, extent or a modality's intensity skewness lies beyond the training "
        f"cohort's 1st-99th percentile range widened by {SOFT_PAD:g} of it"
    )
    card = {"hard": hard, "soft": soft if reference else "none: the cohort's profile was not recorded"}
    if doubt:
        card["doubt"] = {
            "out_of_distribution": f"feature distance over {doubt['distance_threshold']:.3g}, the "
            f"{doubt['quantile']:.0%} quantile of the out-of-fold patients'",
            **(
                {"fold_disagreement": f"fold p(HGG) range over {doubt['spread_threshold']:.3g}"}
                if "spread_threshold" in doubt
                else {}
            ),
        }
    return card
