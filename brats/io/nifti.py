"""NIfTI files read whole and verified, and written whole: the one place that reads or writes one.

Reading decompresses each file once and verifies it (every gzip member's CRC and length, the
voxel bytes its header needs), takes the geometry and pixel type as SimpleITK reads them (so
orientation handling is ITK's, LPS), and refuses NaN/Inf or float32-overflowing values. Writing
builds the header with nibabel and compresses the voxels straight from the image's buffer.

No torch here: predict.py reads scans and writes maps with it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from brats.errors import BratsError
from brats.io.atomic import atomic_path
from brats.io.compression import GZIP_MAGIC, UnusableFile, gzip_packer, inflate
from brats.io.processes import pid_alive

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
GZIP_LEVEL = 1  # maps compress little better at higher levels, and far slower
HEADER_PREFIX = "brats-header-"  # temporary header files: brats-header-<pid>-<image>.header-*.nii


def remove_stale_headers() -> int:
    """Remove the temporary header files (read_geometry) that killed readers left behind; a live
    process's are kept. Returns how many were removed."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{HEADER_PREFIX}*.nii"):
        pid = path.name[len(HEADER_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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
    fd, name = tempfile.mkstemp(prefix=f"{HEADER_PREFIX}{os.getpid()}-{name}.header-", suffix=".nii")
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


def check_header_geometry(header: nib.Nifti1Header) -> None:
    """What ITK would silently replace: a voxel spacing that is not a positive number (ITK reads
    1 mm instead) and a sform or qform holding NaN or infinity."""
    spacing = [float(v) for v in header["pixdim"][1:4]]
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise UnusableFile(
            f"its header's voxel spacing {tuple(spacing)} mm is not positive (pixdim): fix the header "
            "or re-export the image"
        )
    if int(header["sform_code"]) > 0:
        srow = np.concatenate([header["srow_x"], header["srow_y"], header["srow_z"]])
        if not np.isfinite(srow).all():
            raise UnusableFile(
                "its header's sform holds NaN or infinite values: fix the header or re-export the image"
            )
    if int(header["qform_code"]) > 0:
        quatern = [
            float(header[k])
            for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
        ]
        if not np.isfinite(quatern).all():
            raise UnusableFile(
                "its header's qform holds NaN or infinite values: fix the header or re-export the image"
            )


def read_nifti(path: Path) -> sitk.Image:
    """One NIfTI file as a SimpleITK image, verified whole; raises UnusableFile saying why not."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UnusableFile(str(e.strerror or type(e).__name__)) from e
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
    check_header_geometry(header)
    info = read_geometry(itk_header(header, raw), path.name)
    geometry = (*info.GetOrigin(), *info.GetSpacing(), *info.GetDirection())
    if not all(np.isfinite(geometry)) or min(info.GetSpacing()) <= 0:
        raise UnusableFile(
            f"invalid geometry (origin {info.GetOrigin()}, spacing {info.GetSpacing()} mm): fix the "
            "header or re-export the image"
        )
    if info.GetDimension() != 3 or info.GetNumberOfComponents() != 1:
        raise UnusableFile(
            f"is {info.GetDimension()}D with {info.GetNumberOfComponents()} component(s): "
            "need one 3D scalar volume",
            unreadable=False,
        )
    size = info.GetSize()  # x, y, z
    out_dtype = PIXEL_DTYPES.get(info.GetPixelID())
    if out_dtype is None:
        raise UnusableFile(
            f"holds {sitk.GetPixelIDValueAsString(info.GetPixelID())} voxels: "
            "re-export it as a scalar image (e.g. int16 or float32)",
            unreadable=False,
        )
    if int(np.prod(size)) != n_voxels:
        raise UnusableFile(f"corrupt header (dims {shape} but ITK reads {size}): re-export it")
    voxels = np.frombuffer(raw, dtype, count=n_voxels, offset=offset)
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isfinite(slope) and slope != 0 and (slope != 1 or (np.isfinite(inter) and inter != 0)):
        # NIfTI scaling, in float64 as ITK computes it; a slope of 0 or NaN means "not scaled"
        voxels = voxels * slope + (inter if np.isfinite(inter) else 0.0)
    voxels = voxels.astype(np.dtype(out_dtype), copy=False).reshape(size[::-1])  # (z, y, x), native order
    check_values(voxels)
    image = sitk.GetImageFromArray(voxels)
    try:
        image.SetOrigin(info.GetOrigin())
        image.SetSpacing(info.GetSpacing())
        image.SetDirection(info.GetDirection())
    except RuntimeError as e:  # e.g. a spacing of 0 or a singular direction matrix
        raise UnusableFile(
            f"invalid geometry in its header (spacing {info.GetSpacing()} mm, direction "
            f"{info.GetDirection()}): fix or re-export it"
        ) from e
    return image


def check_values(voxels: np.ndarray) -> None:
    """NaN/Inf, and magnitudes that float32 preprocessing would overflow, are refused."""
    if voxels.dtype.kind != "f" and voxels.dtype.itemsize < 8:
        return  # 8-32 bit integers are always finite and below MAX_ABS_VALUE
    lo, hi = float(voxels.min()), float(voxels.max())  # NaN propagates through min/max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise UnusableFile("has NaN or Inf voxels: fix or re-export the image", unreadable=False)
    peak = max(-lo, hi)
    if peak > MAX_ABS_VALUE:
        raise UnusableFile(
            f"has values up to {peak:.3g}, beyond the {MAX_ABS_VALUE:.0e} that float32 preprocessing "
            "handles: rescale the image (e.g. re-export it as int16 or float32)",
            unreadable=False,
        )


def nifti_header(image: sitk.Image) -> nib.Nifti1Header:
    """A NIfTI-1 header for a float32 `image` with its geometry: qform and sform both the RAS
    affine of ITK's LPS origin, direction and spacing, as ITK writes them."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(image.GetSize())  # x, y, z
    header.set_qform(affine, code=1)  # scanner coordinates
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    header.set_slope_inter(1.0, 0.0)
    header["vox_offset"] = header.single_vox_offset
    return header


def write_nifti_atomic(image: sitk.Image, path: str | Path) -> Path:
    """Write a float32 `image` as compressed NIfTI; the file is whole or absent (and any old one
    kept).

    The header comes from `nifti_header`, the voxels straight from the image's buffer, and gzip
    runs at level 1: SimpleITK's own writer compresses at zlib's default level whatever level it
    is asked for, about 5x slower for a file of the same size (bench/RESULTS.md, "CAM files").
    Read back by ITK, the geometry and voxels are the image's (tests/test_cam.py, LPS, RAS and
    oblique).
    """
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise BratsError(f"{path}: a NIfTI map's file name must end in .nii.gz")
    if image.GetPixelID() != sitk.sitkFloat32 or image.GetDimension() != 3:
        raise BratsError(f"{path}: a map is written as a 3D float32 image")
    voxels = sitk.GetArrayViewFromImage(image)  # (z, y, x): x varies fastest, as NIfTI stores it
    packer = gzip_packer(GZIP_LEVEL)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(packer.compress(nifti_header(image).binaryblock + bytes(4)))  # 4: no extensions
        f.write(packer.compress(np.ascontiguousarray(voxels, dtype="<f4").data))
        f.write(packer.flush())
    return path
