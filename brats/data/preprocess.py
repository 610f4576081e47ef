"""Four NIfTI volumes -> one float32 (4, S, S, S) array; the same code at training and prediction.

Steps (RECIPE.md 3.2 / 6.2 input): read each file once and verify it whole (every gzip member's CRC
and length, the voxel bytes its header needs; geometry and pixel type as SimpleITK reads them),
check that the modalities share shape, spacing and orientation, brain mask = voxels non-zero in
any modality, then ONE linear resampling per modality onto a canonical LPS grid that covers the
mask's bounding box padded to a cube (so the aspect ratio is kept) with S voxels a side:
reorientation, crop, pad and resize in a single pass. Each modality is z-scored over that
patient's brain voxels only (no cohort statistics, so nothing leaks across folds); background is 0.

No torch here: predict.py runs without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brats.data.cohort import MODALITIES, Case
from brats.errors import BratsError, CaseError
from brats.io.compression import UnusableFile
from brats.io.nifti import read_nifti

# Bump when the output of preprocess_case changes for the same input: it invalidates caches and
# is checked by predict.py against the contract stored in an exported model.
PREPROCESS_VERSION = 1
ORIENTATION = "LPS"  # axes of the output grid, SimpleITK/DICOM convention (identity direction)
SPACING_RTOL = 1e-3  # modalities must agree on spacing to this relative tolerance
DIRECTION_ATOL = 1e-3  # ... and on direction cosines to this absolute tolerance
ORIGIN_ATOL_VOXELS = 0.1  # ... and on where voxel (0, 0, 0) lies, to a tenth of the smallest voxel


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing contract: stored in the cache index, in every checkpoint and in exported
    models (as `to_contract()`), and read back with `from_contract()`, the one place that decides
    what this code can honour."""

    size: int = 128  # S: output cube side in voxels (RECIPE.md 6.2: 128^3)
    modalities: tuple[str, ...] = MODALITIES  # channel order (RECIPE.md 3.2: T1, T1ce, T2, FLAIR)
    orientation: str = ORIENTATION
    normalization: str = "zscore-brain"  # per patient, per modality, over brain voxels
    version: int = PREPROCESS_VERSION

    def to_contract(self) -> dict:
        """Plain JSON values; also part of every cached volume's fingerprint, so unchanged keys
        and values keep existing caches valid."""
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        return d

    @staticmethod
    def _read(contract: dict) -> dict:
        # Models exported before the contract had one home store `preprocess_version` (and an
        # `input` note, ignored here).
        d = dict(contract)
        if "version" not in d and "preprocess_version" in d:
            d["version"] = d["preprocess_version"]
        return d

    @classmethod
    def from_contract(cls, contract: dict, source: str | Path) -> PreprocessConfig:
        """The config a stored contract asks for; refuses (naming `source`) what this code cannot
        reproduce exactly rather than approximating it."""
        if not isinstance(contract, dict):
            raise BratsError(
                f"{source}: unknown preprocessing contract (a {type(contract).__name__}, not a mapping): "
                "use the brats version that wrote it"
            )
        d = contract
        problems = []
        # A version under either name (see _read) that this code does not implement is refused.
        claimed = [d[k] for k in ("version", "preprocess_version") if k in d] or [None]
        unknown = [v for v in claimed if v != PREPROCESS_VERSION]
        if unknown:
            problems.append(f"preprocessing version {unknown[0]} (this code implements {PREPROCESS_VERSION})")
        if d.get("orientation") != ORIENTATION:
            problems.append(f"orientation {d.get('orientation')}")
        if d.get("normalization") != cls.normalization:
            problems.append(f"normalisation {d.get('normalization')}")
        raw = d.get("modalities")
        mods = tuple(raw) if isinstance(raw, list | tuple) else (raw,)
        if not mods or len(set(mods)) != len(mods) or any(m not in MODALITIES for m in mods):
            problems.append(f"modalities {mods}")
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.append(f"size {size!r}")
        if problems:
            raise BratsError(
                f"{source}: unknown preprocessing contract ({'; '.join(problems)}): "
                "use the brats version that wrote it"
            )
        return cls(size=size, modalities=mods)

    @classmethod
    def differences(cls, a: dict, b: dict) -> list[tuple[str, object, object]]:
        """(setting, value in a, value in b) for each setting on which two stored contracts
        differ. Channels aside: a model reads a subset of a cache's channels, each preprocessed
        on its own."""
        a, b = cls._read(a), cls._read(b)
        names = [f.name for f in fields(cls) if f.name != "modalities"]
        return [(n, a.get(n), b.get(n)) for n in names if a.get(n) != b.get(n)]


def read_image(case: Case, modality: str) -> sitk.Image:
    """Read one modality, verified whole (brats.io.nifti.read_nifti); any failure becomes a
    CaseError naming the patient, the file and the fix."""
    path = case.path(modality)
    try:
        return read_nifti(path)
    except UnusableFile as e:
        where = f"cannot read {modality} file {path}: " if e.unreadable else f"{modality} file {path} "
        raise CaseError(case.patient_id, where + e.reason) from e


def check_same_grid(case: Case, images: list[sitk.Image]) -> None:
    """The modalities must be co-registered on one voxel grid (BraTS ships them so)."""
    ref = images[0]
    for mod, img in zip(MODALITIES[1:], images[1:]):
        what = None
        if img.GetSize() != ref.GetSize():
            what = f"shape {img.GetSize()} but t1 has {ref.GetSize()}"
        elif not np.allclose(img.GetSpacing(), ref.GetSpacing(), rtol=SPACING_RTOL):
            what = f"spacing {img.GetSpacing()} mm but t1 has {ref.GetSpacing()} mm"
        elif not np.allclose(img.GetDirection(), ref.GetDirection(), atol=DIRECTION_ATOL):
            what = "an orientation (direction) different from t1"
        elif not np.allclose(
            img.GetOrigin(), ref.GetOrigin(), rtol=0, atol=ORIGIN_ATOL_VOXELS * min(ref.GetSpacing())
        ):
            shift = float(np.linalg.norm(np.subtract(img.GetOrigin(), ref.GetOrigin())))
            what = f"its origin {shift:.3g} mm away from t1's"
        if what:
            raise CaseError(
                case.patient_id,
                f"{mod} file {case.path(mod)} has {what}: the four modalities must be "
                "co-registered on the same grid (resample them to the t1 first)",
            )


def brain_mask(arrays: list[np.ndarray]) -> np.ndarray:
    """Voxels non-zero in any modality (real files hold small negative values inside the brain)."""
    mask = arrays[0] != 0
    for a in arrays[1:]:
        mask |= a != 0
    return mask


def box_corners(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """The 8 voxel-edge corners of the mask's bounding box in physical space (x, y, z mm), (8, 3):
    right for any orientation, an oblique one too."""
    idx = [np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]  # z, y, x
    lo = [int(i[0]) - 0.5 for i in idx][::-1]  # -> x, y, z (SimpleITK index order)
    hi = [int(i[-1]) + 0.5 for i in idx][::-1]
    return np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint((cx, cy, cz))
            for cx in (lo[0], hi[0])
            for cy in (lo[1], hi[1])
            for cz in (lo[2], hi[2])
        ]
    )


def cube_grid(image: sitk.Image, mask: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Origin (x, y, z mm) and spacing (mm) of an LPS-aligned cube of `size`^3 voxels that holds
    the mask's bounding box, centred on it.

    The box's 8 voxel-edge corners go to physical space, so any input orientation (an oblique
    one too) is handled; the cube side is the box's longest physical extent.
    """
    corners = box_corners(image, mask)
    low, high = corners.min(axis=0), corners.max(axis=0)
    spacing = float((high - low).max()) / size
    origin = (low + high) / 2 - spacing * (size - 1) / 2
    return origin, spacing


def _axis_plan(
    n_in: int, origin_in: float, spacing_in: float, origin_out: float, spacing_out: float, size: int
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis: the input range [lo, hi] it reads, and for each output
    voxel the two neighbours (indices into that range padded by one zero each side) and weight."""
    pos = (origin_out + spacing_out * np.arange(size) - origin_in) / spacing_in
    left = np.floor(pos).astype(np.int64)
    weight = (pos - left).astype(np.float32)
    left = np.clip(left, -1, n_in)
    right = np.clip(left + 1, -1, n_in)
    lo, hi = max(int(left.min()), 0), min(int(right.max()), n_in - 1)
    return lo, hi, left - lo + 1, right - lo + 1, weight


def resample_lps(images: list[sitk.Image], origin: np.ndarray, spacing: float, size: int) -> np.ndarray:
    """Linear resampling of axis-aligned LPS images onto the cube grid -> float32 (C, S, S, S).

    Separable (z, then y, then x) on the needed crop only, one channel at a time so that the
    working set stays in cache: the same values as sitk.Resample with a linear interpolator and
    a 0 default, in well under its single-threaded time.
    """
    org, sp, n = images[0].GetOrigin(), images[0].GetSpacing(), images[0].GetSize()
    plans = [_axis_plan(n[a], org[a], sp[a], origin[a], spacing, size) for a in (2, 1, 0)]  # z,y,x
    (z0, z1, *_), (y0, y1, *_), (x0, x1, *_) = plans
    out = np.empty((len(images), size, size, size), np.float32)
    crop = np.zeros((z1 - z0 + 3, y1 - y0 + 3, x1 - x0 + 3), np.float32)  # rim of zeros
    for c, image in enumerate(images):
        crop[1:-1, 1:-1, 1:-1] = sitk.GetArrayViewFromImage(image)[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1]
        vol = crop
        for axis, (_, _, left, right, weight) in enumerate(plans):
            shape = [1, 1, 1]
            shape[axis] = -1
            a0 = np.take(vol, left, axis=axis)
            vol = np.take(vol, right, axis=axis)
            vol -= a0
            vol *= weight.reshape(shape)
            vol += a0
        out[c] = vol
    return out


def resample_any(images: list[sitk.Image], origin: np.ndarray, spacing: float, size: int) -> np.ndarray:
    """sitk.Resample onto the LPS cube grid; for inputs whose axes are oblique to LPS."""
    out = np.empty((len(images), size, size, size), dtype=np.float32)
    for c, image in enumerate(images):
        resampled = sitk.Resample(
            image,
            (size,) * 3,
            sitk.Transform(),
            sitk.sitkLinear,
            tuple(origin),
            (spacing,) * 3,
            (1, 0, 0, 0, 1, 0, 0, 0, 1),
            0.0,
            sitk.sitkFloat32,
        )
        out[c] = sitk.GetArrayViewFromImage(resampled)
    return out


def zscore_brain(volume: np.ndarray) -> np.ndarray:
    """(C, S, S, S) in place: each channel z-scored over the voxels non-zero in any channel.

    Voxels outside that mask are 0 in every channel, so sums over the whole channel are sums over
    the brain; the variance is taken after centring (exact in float32).
    """
    mask = brain_mask(list(volume))
    outside = ~mask
    n = max(int(mask.sum()), 1)
    for channel in volume:
        channel -= channel.sum(dtype=np.float64) / n
        channel[outside] = 0.0
        flat = channel.reshape(-1)
        std = float(np.sqrt(np.dot(flat, flat) / n))
        channel /= std if std > 1e-8 else 1.0
    return volume


@dataclass(frozen=True)
class CubeGrid:
    """Where the (S, S, S) cube of one patient lies: an LPS grid (identity direction) in mm."""

    origin: tuple[float, float, float]  # physical x, y, z (mm) of voxel (0, 0, 0)'s centre
    spacing_mm: float  # isotropic voxel size
    size: int  # S voxels a side


def preprocess_case(case: Case, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Read and preprocess one patient -> float32 (C, S, S, S), channels in `cfg.modalities`.

    Raises CaseError (naming the patient and the file) for unreadable, damaged or truncated
    files, 2D/4D images, modalities on different grids, NaN/Inf or huge voxels, a blank modality
    and an empty brain.
    """
    return preprocess_with_grid(case, cfg)[0]


def preprocess_with_grid(
    case: Case, cfg: PreprocessConfig = PreprocessConfig()
) -> tuple[np.ndarray, CubeGrid]:
    """`preprocess_case` and the cube grid it resampled onto (to map a cube back onto the scan)."""
    return preprocess_images(case, [read_image(case, m) for m in MODALITIES], cfg)


def preprocess_images(
    case: Case, images: list[sitk.Image], cfg: PreprocessConfig = PreprocessConfig()
) -> tuple[np.ndarray, CubeGrid]:
    """`preprocess_with_grid` on the four images already read (in MODALITIES order), which are
    left as they are: a caller keeps the scans it read, e.g. to draw a map over the FLAIR."""
    check_same_grid(case, images)
    if not np.allclose(images[0].GetDirection(), np.eye(3).ravel(), atol=DIRECTION_ATOL):
        # Flip/permute to LPS axes (exact, no interpolation); an oblique image stays oblique.
        images = [sitk.DICOMOrient(img, ORIENTATION) for img in images]
    arrays = [sitk.GetArrayViewFromImage(img) for img in images]  # (z, y, x) views, no copy
    mask = brain_mask(arrays)
    if not mask.any():
        raise CaseError(
            case.patient_id,
            f"empty brain: every voxel is 0 in all four files (e.g. {case.path('t1')}): "
            "check that the images are not blank",
        )
    for mod, array in zip(MODALITIES, arrays):
        lo, hi = array.min(), array.max()
        if lo == hi:  # a channel of zeros, or a constant that makes the whole field of view "brain"
            what = "all voxels are 0" if hi == 0 else f"every voxel holds the same value ({hi})"
            raise CaseError(
                case.patient_id,
                f"{mod} file {case.path(mod)}: {what} (a blank or failed export): re-export this modality",
            )
    origin, spacing = cube_grid(images[0], mask, cfg.size)
    chosen = [images[MODALITIES.index(m)] for m in cfg.modalities]
    if np.allclose(images[0].GetDirection(), np.eye(3).ravel(), atol=DIRECTION_ATOL):
        volume = resample_lps(chosen, origin, spacing, cfg.size)
    else:
        volume = resample_any(chosen, origin, spacing, cfg.size)
    x0, y0, z0 = (float(v) for v in origin)
    grid = CubeGrid((x0, y0, z0), float(spacing), cfg.size)
    return zscore_brain(volume), grid
