"""Class activation maps at deployment: back onto the patient's own scan, as NIfTI and PNG.

A CAM comes out of the model on the preprocessed cube, an LPS grid (identity direction) that
`brats.preprocess.CubeGrid` places in physical space. Preprocessing read each original voxel
at a physical point and resampled it onto that grid (reorientation, crop, pad and resize in one
step), so the exact inverse is: take the cube as an image with the grid's origin and spacing and
resample it, linearly, onto the original image's grid (any orientation, an oblique one too),
with 0 outside the cube. The result `<patient>_cam.nii.gz` has the geometry of the patient's
FLAIR and overlays it in ITK-SNAP or 3D Slicer.

The map is HGG evidence (`brats.explain`): positive where the model found evidence for HGG,
negative for LGG, in logit units per voxel.

No torch here: predict.py runs without it. matplotlib is imported only to draw a PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brats.atomic import atomic_path
from brats.errors import BratsError
from brats.preprocess import ORIENTATION, CubeGrid

CAM_SUFFIX = "_cam.nii.gz"
PLANES = ("axial", "coronal", "sagittal")
OVERLAY_ALPHA = 0.7  # opacity where |CAM| is largest; fades to 0 where the map is 0


def cube_image(cam: np.ndarray, grid: CubeGrid) -> sitk.Image:
    """A (S, S, S) (z, y, x) map on the cube grid as a float32 image placed in physical space."""
    if cam.shape != (grid.size,) * 3:
        raise BratsError(f"CAM of shape {cam.shape} does not fit a cube grid of {grid.size}^3 voxels")
    image = sitk.GetImageFromArray(np.ascontiguousarray(cam, dtype=np.float32))
    image.SetOrigin(grid.origin)
    image.SetSpacing((grid.spacing_mm,) * 3)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # the cube is LPS-aligned
    return image


def cam_on_reference(cam: np.ndarray, grid: CubeGrid, reference: sitk.Image) -> sitk.Image:
    """The cube's map resampled onto `reference`'s voxel grid (its size, origin, spacing and
    direction): float32, linear interpolation, 0 outside the cube."""
    return sitk.Resample(
        cube_image(cam, grid),
        reference.GetSize(),
        sitk.Transform(),  # identity: both grids are in the same physical space
        sitk.sitkLinear,
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


def cam_path(out_dir: str | Path, patient_id: str) -> Path:
    return Path(out_dir) / f"{patient_id}{CAM_SUFFIX}"


def write_nifti_atomic(image: sitk.Image, path: str | Path) -> Path:
    """Write `image` as compressed NIfTI; the file is whole or absent (and any old one kept)."""
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise BratsError(f"{path}: a CAM file name must end in .nii.gz")
    with atomic_path(path) as tmp:
        # ITK chooses its writer by the name's ending: write under one ending in .nii.gz
        named = tmp.with_name(tmp.name + ".nii.gz")
        try:
            sitk.WriteImage(image, str(named), useCompression=True)
            named.replace(tmp)
        except RuntimeError as e:
            raise BratsError(f"cannot write {path}: {str(e).strip().splitlines()[-1][:160]}") from e
        finally:
            named.unlink(missing_ok=True)
    return path


def write_case_cam(
    out_dir: str | Path, patient_id: str, cam: np.ndarray, grid: CubeGrid, reference: sitk.Image
) -> Path:
    """`<out_dir>/<patient_id>_cam.nii.gz`: the cube's map on the reference scan's grid."""
    return write_nifti_atomic(cam_on_reference(cam, grid, reference), cam_path(out_dir, patient_id))


def peak_index(
    cam: np.ndarray, toward_hgg: bool = True, within: np.ndarray | None = None
) -> tuple[int, int, int]:
    """(z, y, x) index of the strongest evidence for HGG (`toward_hgg`) or for LGG (the minimum), among
    the voxels of `within` (e.g. the brain) when given and not empty.

    An upsampled map is flat around its coarse cells' centres at the edges, so the maximum is
    often reached on a plateau: take the voxel of the plateau nearest its centroid, not the first.
    """
    values = np.asarray(cam, dtype=np.float64) * (1.0 if toward_hgg else -1.0)
    if within is not None and within.any():
        values = np.where(within, values, -np.inf)
    top = values.max()
    tie = abs(top) * 1e-6 + 1e-12
    at_top = np.argwhere(values >= top - tie)
    nearest = np.argmin(((at_top - at_top.mean(axis=0)) ** 2).sum(axis=1))
    z, y, x = (int(i) for i in at_top[nearest])  # a (z, y, x) volume
    return z, y, x


def _planes(volume: np.ndarray, at: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a (z, y, x) LPS volume through `at`, each turned so
    that the patient's left is on the image's right and superior (or anterior, axial) is up."""
    z, y, x = at
    return [volume[z], volume[::-1, y, :], volume[::-1, :, x]]


def _aspects(spacing_xyz: tuple[float, float, float]) -> list[float]:
    sx, sy, sz = spacing_xyz
    return [sy / sx, sz / sx, sz / sy]  # height / width of one pixel, per plane


def write_planes_png(
    path: str | Path,
    underlay: np.ndarray,
    cam: np.ndarray,
    title: str,
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0),
    at: tuple[int, int, int] | None = None,
    toward_hgg: bool = True,
) -> Path:
    """A PNG of three orthogonal planes of a (z, y, x) LPS `underlay` (grey) with `cam` over it
    (red = HGG evidence, blue = LGG evidence, transparent where 0), through `at` (default: the
    peak for the predicted grade, `toward_hgg`, inside the brain: the underlay's non-zero
    voxels). Written atomically; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display: also on servers
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    if underlay.shape != cam.shape or underlay.ndim != 3:
        raise BratsError(f"{path}: underlay {underlay.shape} and CAM {cam.shape} must be the same 3D shape")
    if at is None:
        at = peak_index(cam, toward_hgg, within=underlay != 0)
    brain = underlay[underlay != 0]
    lo, hi = np.percentile(brain, (1, 99)) if brain.size else (0.0, 1.0)
    limit = float(np.abs(cam).max()) or 1.0
    norm = Normalize(-limit, limit)  # symmetric: 0 (no evidence either way) sits in the middle
    colours = plt.get_cmap("RdBu_r")
    greys = plt.get_cmap("gray").with_extremes(bad="black")
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.9), constrained_layout=True)
    for ax, name, grey, heat, aspect in zip(
        axes, PLANES, _planes(underlay, at), _planes(cam, at), _aspects(spacing_xyz)
    ):
        # background (exactly 0, also in z-scored input) black, whatever the intensity scale
        ax.imshow(
            np.ma.masked_equal(grey, 0), cmap=greys, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest"
        )
        rgba = colours(norm(heat))
        rgba[..., 3] = OVERLAY_ALPHA * np.clip(np.abs(heat) / limit, 0.0, 1.0)
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    bar = fig.colorbar(plt.cm.ScalarMappable(norm, colours), ax=axes, shrink=0.8)
    bar.set_label("HGG evidence (logit per voxel)", fontsize=8)
    fig.suptitle(f"{title}  (R on the left; planes through voxel z, y, x = {at})", fontsize=9)
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def write_case_png(
    path: str | Path, cam_image: sitk.Image, flair: sitk.Image, title: str, toward_hgg: bool = True
) -> Path:
    """Three planes through the CAM peak with the patient's FLAIR underneath, both on the FLAIR's
    own grid (`cam_on_reference`), shown in LPS axes whatever the file's orientation."""
    cam_lps = sitk.DICOMOrient(cam_image, ORIENTATION)  # permutes and flips only: no interpolation
    flair_lps = sitk.DICOMOrient(flair, ORIENTATION)
    sx, sy, sz = flair_lps.GetSpacing()
    return write_planes_png(
        path,
        sitk.GetArrayFromImage(flair_lps).astype(np.float32),
        sitk.GetArrayFromImage(cam_lps),
        title,
        spacing_xyz=(sx, sy, sz),
        toward_hgg=toward_hgg,
    )
