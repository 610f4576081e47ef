"""Four NIfTI volumes -> one float32 (4, S, S, S) array; the same code at training and prediction.

Steps (seed 3.2 / 6.2 input): read each file once and verify it whole (every gzip member's CRC
and length, the voxel bytes its header needs; geometry and pixel type as SimpleITK reads them),
check that the modalities share shape, spacing and orientation, brain mask = voxels non-zero in
any modality, then ONE linear resampling per modality onto a canonical LPS grid that covers the
mask's bounding box padded to a cube (so the aspect ratio is kept) with S voxels a side:
reorientation, crop, pad and resize in a single pass. Each modality is z-scored over that
patient's brain voxels only (no cohort statistics, so nothing leaks across folds); background is 0.

No torch here: predict.py runs without it.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from brats.cohort import MODALITIES, Case
from brats.errors import BratsError, CaseError

try:  # ISA-L inflates gzip about twice as fast as zlib, with the same checks (bench/RESULTS.md)
    from isal import isal_zlib as ZLIB_MODULE
except ImportError:
    ZLIB_MODULE = zlib

# Bump when the output of preprocess_case changes for the same input: it invalidates caches and
# is checked by predict.py against the contract stored in an exported model.
PREPROCESS_VERSION = 1
ORIENTATION = "LPS"  # axes of the output grid, SimpleITK/DICOM convention (identity direction)
SPACING_RTOL = 1e-3  # modalities must agree on spacing to this relative tolerance
DIRECTION_ATOL = 1e-3  # ... and on direction cosines to this absolute tolerance
GZIP_MAGIC = b"\x1f\x8b"
# Largest |voxel| accepted: resampling and z-scoring run in float32, and the sum of squares of up to
# 2^31 centred voxels (|v| <= 2e12) stays far below float32's 3.4e38. MRI intensities are < 1e7.
MAX_ABS_VALUE = 1e12
# SimpleITK pixel types a scalar NIfTI is read as -> numpy dtype of the voxel array
PIXEL_DTYPES = {
    sitk.sitkUInt8: np.uint8,
    sitk.sitkInt8: np.int8,
    sitk.sitkUInt16: np.uint16,
    sitk.sitkInt16: np.int16,
    sitk.sitkUInt32: np.uint32,
    sitk.sitkInt32: np.int32,
    sitk.sitkUInt64: np.uint64,
    sitk.sitkInt64: np.int64,
    sitk.sitkFloat32: np.float32,
    sitk.sitkFloat64: np.float64,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing contract: stored in the cache index, in every checkpoint and in exported
    models (as `to_contract()`), and read back with `from_contract()`, the one place that decides
    what this code can honour."""

    size: int = 128  # S: output cube side in voxels (seed 6.2: 128^3)
    modalities: tuple[str, ...] = MODALITIES  # channel order (seed 3.2: T1, T1ce, T2, FLAIR)
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


class UnusableFile(Exception):
    """Why one NIfTI file cannot be used, ending in the fix; read_image adds patient and file."""


def inflate(data: bytes, zlib_module: ModuleType | None = None) -> bytes:
    """Decompress every member of a gzip stream, checking each member's CRC-32 and length.

    ITK's NIfTI reader checks neither and fills a short stream with zeros, so a damaged file would
    be graded on wrong voxels. Zero bytes after the last member (padding some tools write) are
    allowed, as gzip allows them.
    """
    zlib_module = zlib_module or ZLIB_MODULE
    parts = []
    rest = data
    while True:
        if rest[:2] != GZIP_MAGIC:
            raise UnusableFile(
                f"corrupt gzip data ({len(rest)} bytes after the end of the stream are neither gzip "
                "nor padding): the file was damaged or overwritten; re-copy or re-download it"
            )
        member = zlib_module.decompressobj(31)  # 16 + 15: gzip wrapper, 32 KB window
        try:
            parts.append(member.decompress(rest))
        except zlib_module.error as e:
            raise UnusableFile(
                f"corrupt gzip data ({e}): the file was damaged on disk or in transfer; "
                "re-copy or re-download it"
            ) from e
        if not member.eof:
            raise UnusableFile(
                "truncated: the gzip stream ends early (an interrupted copy or download?); "
                "re-copy or re-download it"
            )
        rest = member.unused_data
        if rest.count(0) == len(rest):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def parse_header(raw: bytes) -> nib.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header (either byte order) at the start of an uncompressed file."""
    not_nifti = "not a NIfTI image (no NIfTI-1/NIfTI-2 header at its start): re-export it as .nii or .nii.gz"
    if len(raw) < 4:
        raise UnusableFile(f"{not_nifti} (the file holds {len(raw)} bytes)")
    kinds = {nib.Nifti1Header.sizeof_hdr: nib.Nifti1Header, nib.Nifti2Header.sizeof_hdr: nib.Nifti2Header}
    kind = kinds.get(int.from_bytes(raw[:4], "little")) or kinds.get(int.from_bytes(raw[:4], "big"))
    if kind is None or len(raw) < kind.sizeof_hdr:
        raise UnusableFile(not_nifti)
    header = kind(raw[: kind.sizeof_hdr], check=False)  # byte order guessed from sizeof_hdr
    if header["magic"] not in (b"n+1", b"n+2"):
        raise UnusableFile(
            f"not a single-file NIfTI image (magic {bytes(header['magic'])!r}; an Analyze or "
            ".hdr/.img pair?): convert it to .nii or .nii.gz"
        )
    return header


def itk_header(header: nib.Nifti1Header, raw: bytes) -> bytes:
    """A header-only single-file NIfTI-1 that ITK reads the geometry and pixel type from.

    ITK (SimpleITK 2.5) cannot read NIfTI-2, so its fields are copied into a NIfTI-1 header; the
    geometry then comes from ITK's own reading of qform/sform in every case.
    """
    if not isinstance(header, nib.Nifti2Header):
        return raw[: header.sizeof_hdr] + bytes(4)  # no extensions: ITK needs the geometry only
    if max(header["dim"]) > np.iinfo(np.int16).max:
        raise UnusableFile(
            f"NIfTI-2 image of {tuple(header.get_data_shape())} voxels: larger than this tool "
            "reads (32767 a side); crop or resample it"
        )
    n1 = nib.Nifti1Header(endianness=header.endianness)
    for name in n1.keys():
        if name in header.keys() and name not in ("sizeof_hdr", "magic", "vox_offset"):
            n1[name] = header[name]
    n1["vox_offset"] = n1.single_vox_offset
    return n1.binaryblock + bytes(4)


def read_geometry(header_bytes: bytes, name: str) -> sitk.ImageFileReader:
    """ITK's reading of a header (size, spacing, origin, direction, pixel type); ITK reads only
    from files, so the header goes through a small temporary file named after the image `name`
    (ITK's warnings quote it)."""
    fd, name = tempfile.mkstemp(prefix=f"{name}.header-", suffix=".nii")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header_bytes)
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        return reader
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable header"
        raise UnusableFile(f"not a NIfTI image ITK can read ({last[:160]}): re-export it") from e
    finally:
        os.unlink(name)


def read_image(case: Case, modality: str) -> sitk.Image:
    """Read one modality, decompressing it once and verifying it whole (every gzip member's CRC
    and length, and the voxel bytes the header needs); geometry and pixel type as SimpleITK reads
    them, so orientation handling is ITK's (LPS). Any failure becomes a CaseError naming
    patient, file and fix.
    """
    path = case.path(modality)
    pid = case.patient_id
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaseError(pid, f"cannot read {modality} file {path}: {e.strerror}") from e
    try:
        raw = inflate(data) if data[:2] == GZIP_MAGIC else data
        header = parse_header(raw)
        try:
            shape = tuple(int(n) for n in header.get_data_shape())
            dtype = header.get_data_dtype()
            # vox_offset may be stored as 0 (or any value inside the header): the data then start
            # right after it (NIfTI-1: byte 352, NIfTI-2: 544); extensions before it are skipped.
            offset = max(int(header["vox_offset"]), header.single_vox_offset)
        except Exception as e:
            raise UnusableFile(f"not a NIfTI image (corrupt header: {str(e)[:120]}): re-export it") from e
        n_voxels = int(np.prod(shape))
        need = offset + n_voxels * dtype.itemsize
        if len(raw) < need:
            packed = " after decompression" if raw is not data else ""
            voxels = f"{'x'.join(map(str, shape))} {dtype.name} voxels from byte {offset}"
            raise UnusableFile(
                f"truncated (or its header is corrupt): the header needs {need} bytes ({voxels}), "
                f"the file holds {len(raw)}{packed}; re-copy or re-download it"
            )
        info = read_geometry(itk_header(header, raw), path.name)
    except UnusableFile as e:
        raise CaseError(pid, f"cannot read {modality} file {path}: {e}") from e

    if info.GetDimension() != 3 or info.GetNumberOfComponents() != 1:
        raise CaseError(
            pid,
            f"{modality} file {path} is {info.GetDimension()}D with "
            f"{info.GetNumberOfComponents()} component(s): need one 3D scalar volume",
        )
    size = info.GetSize()  # x, y, z
    out_dtype = PIXEL_DTYPES.get(info.GetPixelID())
    if out_dtype is None:
        raise CaseError(
            pid,
            f"{modality} file {path} holds {sitk.GetPixelIDValueAsString(info.GetPixelID())} voxels: "
            "re-export it as a scalar image (e.g. int16 or float32)",
        )
    if int(np.prod(size)) != n_voxels:
        raise CaseError(
            pid,
            f"cannot read {modality} file {path}: corrupt header (dims {shape} but ITK reads "
            f"{size}): re-export it",
        )
    voxels = np.frombuffer(raw, dtype, count=n_voxels, offset=offset)
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isfinite(slope) and slope != 0 and (slope != 1 or (np.isfinite(inter) and inter != 0)):
        # NIfTI scaling, in float64 as ITK computes it; a slope of 0 or NaN means "not scaled"
        voxels = voxels * slope + (inter if np.isfinite(inter) else 0.0)
    voxels = voxels.astype(np.dtype(out_dtype), copy=False).reshape(size[::-1])  # (z, y, x), native order
    check_values(case, modality, voxels)
    image = sitk.GetImageFromArray(voxels)
    try:
        image.SetOrigin(info.GetOrigin())
        image.SetSpacing(info.GetSpacing())
        image.SetDirection(info.GetDirection())
    except RuntimeError as e:  # e.g. a spacing of 0 or a singular direction matrix
        raise CaseError(
            pid,
            f"cannot read {modality} file {path}: invalid geometry in its header (spacing "
            f"{info.GetSpacing()} mm, direction {info.GetDirection()}): fix or re-export it",
        ) from e
    return image


def check_values(case: Case, modality: str, voxels: np.ndarray) -> None:
    """NaN/Inf, and magnitudes that float32 preprocessing would overflow, are refused."""
    if voxels.dtype.kind != "f" and voxels.dtype.itemsize < 8:
        return  # 8-32 bit integers are always finite and below MAX_ABS_VALUE
    lo, hi = float(voxels.min()), float(voxels.max())  # NaN propagates through min/max
    path = case.path(modality)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CaseError(
            case.patient_id, f"{modality} file {path} has NaN or Inf voxels: fix or re-export the image"
        )
    peak = max(-lo, hi)
    if peak > MAX_ABS_VALUE:
        raise CaseError(
            case.patient_id,
            f"{modality} file {path} has values up to {peak:.3g}, beyond the {MAX_ABS_VALUE:.0e} that "
            "float32 preprocessing handles: rescale the image (e.g. re-export it as int16 or float32)",
        )


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


def cube_grid(image: sitk.Image, mask: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Origin (x, y, z mm) and spacing (mm) of an LPS-aligned cube of `size`^3 voxels that holds
    the mask's bounding box, centred on it.

    The box's 8 voxel-edge corners go to physical space, so any input orientation (an oblique
    one too) is handled; the cube side is the box's longest physical extent.
    """
    idx = [np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]  # z, y, x
    lo = [int(i[0]) - 0.5 for i in idx][::-1]  # -> x, y, z (SimpleITK index order)
    hi = [int(i[-1]) + 0.5 for i in idx][::-1]
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint((cx, cy, cz))
            for cx in (lo[0], hi[0])
            for cy in (lo[1], hi[1])
            for cz in (lo[2], hi[2])
        ]
    )
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
        if not array.any():  # would become a channel of zeros, silently
            raise CaseError(
                case.patient_id,
                f"{mod} file {case.path(mod)}: all voxels are 0 (a blank or failed export): "
                "re-export this modality",
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
