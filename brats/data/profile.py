"""What preprocessing throws away, kept: each scan's geometry, brain and intensities.

The preprocessed cube no longer says whether a scan had 1 mm or 5 mm slices, a skull, a brain cut
by the field of view, or its FLAIR where its T1 should be. `profile_images` measures that on the
files as read, before any resampling or normalisation; `prepare` stores it per patient in the
cache index, `export.py` summarises the training cohort's into the model's contract, and
`predict.py` checks each new patient against it (brats.deploy.qc).

No torch here: predict.py runs without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from brats.data.cohort import MODALITIES
from brats.data.preprocess import box_corners, brain_mask

SAMPLE = 200_000  # brain voxels per modality the intensity statistics are taken from (every n-th)
EDGE_SHARE = 0.01  # brain voxels on a face of the field of view, as a share of the face: "cut"
# Scalar features of a profile, the cohort summary keeps quantiles of each
FEATURES = (
    "spacing_max_mm",
    "brain_ml",
    "nonzero_share",
    "edge_share",
    "extent_x_mm",
    "extent_y_mm",
    "extent_z_mm",
)


@dataclass(frozen=True, kw_only=True)
class ScanProfile:
    """One patient's scans as acquired (the t1's grid; the four share it)."""

    spacing_mm: tuple[float, float, float]  # voxel spacing x, y, z
    size: tuple[int, int, int]  # voxels x, y, z
    orientation: str  # axes' directions, e.g. "LPS" (DICOM convention, as ITK reads it)
    brain_ml: float  # voxels non-zero in any modality, in millilitres
    nonzero_share: float  # of the field of view: 0.15-0.18 in skull-stripped BraTS scans
    extent_mm: tuple[float, float, float]  # the brain's bounding box, physical x, y, z (LPS)
    edge_share: float  # the largest share of a field-of-view face the brain covers (0: not cut)
    skewness: dict[str, float]  # per modality, inside the brain: scale-free, tells T1 from FLAIR
    percentiles: dict[str, tuple[float, float, float]]  # per modality: p1, p50, p99 inside the brain

    @property
    def spacing_max_mm(self) -> float:
        return max(self.spacing_mm)

    def feature(self, name: str) -> float:
        """A scalar of FEATURES, or "skewness_<modality>"."""
        if name.startswith("skewness_"):
            return self.skewness[name.removeprefix("skewness_")]
        if name.startswith("extent_"):
            return self.extent_mm["xyz".index(name[len("extent_")])]
        return float(getattr(self, name))

    def to_json(self) -> dict:
        """Plain JSON values (lists, not tuples): equal to itself read back from the index."""
        d = asdict(self)
        for name in ("spacing_mm", "size", "extent_mm"):
            d[name] = list(d[name])
        d["percentiles"] = {k: list(v) for k, v in d["percentiles"].items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> ScanProfile:
        return cls(
            spacing_mm=tuple(float(v) for v in d["spacing_mm"]),
            size=tuple(int(v) for v in d["size"]),
            orientation=str(d["orientation"]),
            brain_ml=float(d["brain_ml"]),
            nonzero_share=float(d["nonzero_share"]),
            extent_mm=tuple(float(v) for v in d["extent_mm"]),
            edge_share=float(d["edge_share"]),
            skewness={k: float(v) for k, v in d["skewness"].items()},
            percentiles={k: tuple(float(x) for x in v) for k, v in d["percentiles"].items()},
        )


def skewness(values: np.ndarray) -> float:
    """Sample skewness (third standardised moment); 0 for a constant."""
    v = values.astype(np.float64)
    sd = v.std()
    return float(((v - v.mean()) ** 3).mean() / sd**3) if sd > 0 else 0.0


def physical_extent(image: sitk.Image, mask: np.ndarray) -> tuple[float, float, float]:
    """The mask's bounding box in mm along the physical x, y, z axes (any orientation)."""
    corners = box_corners(image, mask)
    x, y, z = (float(v) for v in corners.max(axis=0) - corners.min(axis=0))
    return x, y, z


def edge_share(mask: np.ndarray) -> float:
    """The largest share of one face of the volume that the mask covers."""
    faces = (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1])
    return max(float(face.mean()) for face in faces)


def profile_images(images: list[sitk.Image]) -> ScanProfile:
    """The profile of one patient's four scans (MODALITIES order), as read from disk."""
    arrays = [sitk.GetArrayViewFromImage(img) for img in images]  # (z, y, x)
    mask = brain_mask(arrays)
    spacing = tuple(float(v) for v in images[0].GetSpacing())
    orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(images[0].GetDirection())
    n = int(mask.sum())
    step = max(1, n // SAMPLE)
    skew, pct = {}, {}
    for mod, array in zip(MODALITIES, arrays):
        inside = array[mask][::step].astype(np.float32)
        p1, p50, p99 = (float(v) for v in np.percentile(inside, (1, 50, 99)))
        pct[mod], skew[mod] = (p1, p50, p99), skewness(inside)
    return ScanProfile(
        spacing_mm=spacing,  # type: ignore[arg-type]
        size=tuple(int(v) for v in images[0].GetSize()),  # type: ignore[arg-type]
        orientation=orient,
        brain_ml=n * float(np.prod(spacing)) / 1000.0,
        nonzero_share=n / mask.size,
        extent_mm=physical_extent(images[0], mask),
        edge_share=edge_share(mask),
        skewness=skew,
        percentiles=pct,
    )


def cohort_profile(profiles: list[ScanProfile]) -> dict:
    """The training cohort's profile for the model's contract: per feature, the 1st, 50th and
    99th percentile and the range over the patients; the orientations seen."""
    names = [*FEATURES, *(f"skewness_{m}" for m in MODALITIES)]
    summary = {}
    for name in names:
        values = np.array([p.feature(name) for p in profiles], dtype=np.float64)
        q01, q50, q99 = (float(v) for v in np.percentile(values, (1, 50, 99)))
        summary[name] = {
            "min": float(values.min()),
            "q01": q01,
            "q50": q50,
            "q99": q99,
            "max": float(values.max()),
        }
    return {
        "patients": len(profiles),
        "features": summary,
        "orientations": sorted({p.orientation for p in profiles}),
    }
