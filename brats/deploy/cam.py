"""Class activation maps at deployment: back onto the patient's own scan, as NIfTI and PNG.

A CAM comes out of the model on the preprocessed cube, an LPS grid (identity direction) that
`brats.preprocess.CubeGrid` places in physical space. Preprocessing read each original voxel
at a physical point and resampled it onto that grid (reorientation, crop, pad and resize in one
step), so the exact inverse is: take the cube as an image with the grid's origin and spacing and
resample it, linearly, onto the original image's grid (any orientation, an oblique one too),
with 0 outside the cube. The result `<patient>_cam.nii.gz` has the geometry of the patient's
FLAIR and overlays it in ITK-SNAP or 3D Slicer (written by brats.io.nifti).

The map is HGG evidence (`brats.models.explained`): positive where the model found evidence for HGG,
negative for LGG, in logit units per voxel.

No torch and no matplotlib here: predict.py runs without them (Pillow draws the words and writes
the PNG).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brats.data.preprocess import DIRECTION_ATOL, ORIENTATION, CubeGrid
from brats.errors import BratsError
from brats.io.atomic import atomic_path
from brats.io.names import file_stem
from brats.io.nifti import write_nifti_atomic

CAM_SUFFIX, PNG_SUFFIX = "_cam.nii.gz", "_cam.png"
OVERLAY_ALPHA = 0.7  # opacity where |CAM| is largest; fades to 0 where the map is 0
HGG_RGB, LGG_RGB, MID_RGB = (0.80, 0.10, 0.15), (0.15, 0.35, 0.85), (0.85, 0.85, 0.85)
PLANE_PIXELS = 240  # planes less tall than this are drawn magnified by a whole factor
BAR_PIXELS, GAP_PIXELS = 12, 4
FONT_PIXELS = 13
FLAT_RANGE = 1e-3  # a map whose range over the brain is below this share of its largest |value| is flat


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
    """`<out_dir>/<stem>_cam.nii.gz`, the stem by brats.io.names (the id itself when plain)."""
    return Path(out_dir) / f"{file_stem(patient_id)}{CAM_SUFFIX}"


def png_path(out_dir: str | Path, patient_id: str) -> Path:
    return Path(out_dir) / f"{file_stem(patient_id)}{PNG_SUFFIX}"


def write_case_cam(
    out_dir: str | Path, patient_id: str, cam: np.ndarray, grid: CubeGrid, reference: sitk.Image
) -> Path:
    """`<out_dir>/<patient_id>_cam.nii.gz`: the cube's map on the reference scan's grid."""
    return write_nifti_atomic(cam_on_reference(cam, grid, reference), cam_path(out_dir, patient_id))


def write_case_maps(
    out_dir: str | Path,
    patient_id: str,
    cam: np.ndarray,
    grid: CubeGrid,
    flair: sitk.Image,
    toward_hgg: bool,
    title: str = "",
) -> tuple[Path, Path, bool]:
    """`<patient_id>_cam.nii.gz` (the cube's map on the FLAIR's grid) and `<patient_id>_cam.png`
    (three planes through the peak for the predicted grade, `toward_hgg`, over the FLAIR, titled
    `title` or the id) in `out_dir`; each file is whole or absent. Returns both paths and whether
    the map is flat."""
    nifti, png = cam_path(out_dir, patient_id), png_path(out_dir, patient_id)
    image = cam_on_reference(cam, grid, flair)
    write_nifti_atomic(image, nifti)
    _, flat = write_case_png(png, image, flair, toward_hgg, title or patient_id)
    return nifti, png, flat


def peak_index(
    cam: np.ndarray, toward_hgg: bool = True, within: np.ndarray | None = None
) -> tuple[int, int, int]:
    """(z, y, x) index of the strongest evidence for HGG (`toward_hgg`) or for LGG (the minimum), among
    the voxels of `within` (e.g. the brain) when given and not empty.

    An upsampled map is flat around its coarse cells' centres at the edges, so the maximum is
    often reached on a plateau: take the voxel of the plateau nearest its centroid, not the first.
    """
    values = np.asarray(cam, dtype=np.float32)  # a scan's grid: millions of voxels, few passes
    if not toward_hgg:
        values = -values
    if within is not None and within.any():
        values = np.where(within, values, -np.inf)
    top = float(values.max())
    tie = abs(top) * 1e-6 + 1e-12
    at_top = np.stack(np.unravel_index(np.flatnonzero(values >= top - tie), values.shape), axis=1)
    nearest = np.argmin(((at_top - at_top.mean(axis=0)) ** 2).sum(axis=1))
    z, y, x = (int(i) for i in at_top[nearest])  # a (z, y, x) volume
    return z, y, x


def _planes(volume: np.ndarray, at: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a (z, y, x) LPS volume through `at`, each turned so
    that the patient's left is on the image's right and superior (or anterior, axial) is up."""
    z, y, x = at
    return [volume[z], volume[::-1, y, :], volume[::-1, :, x]]


def _pixel_sizes(spacing_xyz: tuple[float, float, float]) -> list[tuple[float, float]]:
    sx, sy, sz = spacing_xyz
    return [(sy, sx), (sz, sx), (sz, sy)]  # (height, width) of one pixel in mm, per plane


def _square_pixels(plane: np.ndarray, pixel_mm: tuple[float, float], mm_per_pixel: float) -> np.ndarray:
    """Nearest-neighbour resize of a 2D plane (..., extra dims kept) to square pixels of `mm_per_pixel`."""
    rows = max(1, round(plane.shape[0] * pixel_mm[0] / mm_per_pixel))
    cols = max(1, round(plane.shape[1] * pixel_mm[1] / mm_per_pixel))
    r = np.minimum(((np.arange(rows) + 0.5) * plane.shape[0] / rows).astype(int), plane.shape[0] - 1)
    c = np.minimum(((np.arange(cols) + 0.5) * plane.shape[1] / cols).astype(int), plane.shape[1] - 1)
    return plane[r][:, c]


def diverging_colours(t: np.ndarray) -> np.ndarray:
    """t in [-1, 1] -> RGB in [0, 1] (..., 3): blue (LGG evidence) through light grey to red (HGG)."""
    t = np.clip(t, -1.0, 1.0)[..., None]
    mid, red, blue = (np.array(c) for c in (MID_RGB, HGG_RGB, LGG_RGB))
    return np.where(t >= 0, mid + t * (red - mid), mid - t * (blue - mid))


def is_flat(cam: np.ndarray, within: np.ndarray | None = None) -> bool:
    """Whether the map is one value over `within` (the brain; all voxels when empty or None):
    as in the `strided` layout at 32^3 and below, whose last feature map is a single cell. Such a
    map says nothing about where the evidence lies."""
    values = np.asarray(cam, dtype=np.float32)
    if within is not None and within.any():
        values = values[within]
    lo, hi = float(values.min()), float(values.max())
    return hi - lo <= FLAT_RANGE * max(abs(lo), abs(hi), 1e-12)


def plane_panels(
    underlay: np.ndarray,
    cam: np.ndarray,
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0),
    at: tuple[int, int, int] | None = None,
    toward_hgg: bool = True,
    overlay: bool = True,
) -> tuple[list[np.ndarray], tuple[int, int, int], float]:
    """Axial, coronal and sagittal planes of a (z, y, x) LPS `underlay` (grey) with `cam` over it
    (red = HGG evidence, blue = LGG evidence, more opaque where |CAM| is larger, clear where it
    is 0; no map with `overlay` False), each float RGB in [0, 1] in square pixels; planes through
    `at` (default: the peak for the predicted grade, `toward_hgg`, inside the brain: the
    underlay's non-zero voxels). Returns the panels, the (z, y, x) voxel they go through and the
    |CAM| that the colours' ends stand for."""
    if underlay.shape != cam.shape or underlay.ndim != 3:
        raise BratsError(f"underlay {underlay.shape} and CAM {cam.shape} must be the same 3D shape")
    if at is None:
        at = peak_index(cam, toward_hgg, within=underlay != 0)
    # grey levels from the brain in the three planes drawn (the whole volume: 10x the time)
    planes = _planes(underlay, at)
    brain = np.concatenate([plane[plane != 0] for plane in planes]).astype(np.float32)
    lo, hi = np.percentile(brain, (1, 99)) if brain.size else (0.0, 1.0)
    limit = float(np.abs(cam).max()) or 1.0
    pixel_sizes = _pixel_sizes(spacing_xyz)
    mm_per_pixel = min(spacing_xyz)
    tallest = max(plane.shape[0] * h / mm_per_pixel for plane, (h, _) in zip(planes, pixel_sizes))
    mm_per_pixel /= max(1, math.ceil(PLANE_PIXELS / tallest))  # small volumes drawn larger
    panels = []
    for raw, heat, pixel_mm in zip(planes, _planes(cam, at), pixel_sizes):
        # background (exactly 0, also in z-scored input) black, whatever the intensity scale
        raw = raw.astype(np.float32)
        grey = np.where(raw == 0, 0.0, np.clip((raw - lo) / ((hi - lo) or 1.0), 0.0, 1.0))
        alpha = OVERLAY_ALPHA * np.clip(np.abs(heat) / limit, 0.0, 1.0)[..., None] * overlay
        rgb = grey[..., None] * (1 - alpha) + diverging_colours(heat / limit) * alpha
        panels.append(_square_pixels(rgb, pixel_mm, mm_per_pixel))
    return panels, at, limit


def _side_by_side(panels: list[np.ndarray], height: int) -> tuple[np.ndarray, list[int]]:
    """The panels and the colour bar (HGG at the top) in one float RGB row, centred vertically
    on black; returns it and each part's left edge."""
    bar = diverging_colours(np.linspace(1.0, -1.0, height))[:, None, :].repeat(BAR_PIXELS, axis=1)
    gap = np.zeros((height, GAP_PIXELS, 3))
    parts, lefts, x = [], [], 0
    for panel in [*panels, bar]:
        padded = np.zeros((height, panel.shape[1], 3))
        top = (height - panel.shape[0]) // 2
        padded[top : top + panel.shape[0]] = panel
        parts += [padded, gap]
        lefts.append(x)
        x += panel.shape[1] + GAP_PIXELS
    return np.concatenate(parts[:-1], axis=1), lefts


def render_planes(
    underlay: np.ndarray,
    cam: np.ndarray,
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0),
    at: tuple[int, int, int] | None = None,
    toward_hgg: bool = True,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`plane_panels` side by side, then a colour bar (HGG at the top), without words: uint8 RGB
    (H, W, 3) and the (z, y, x) voxel the planes go through. numpy only."""
    panels, at, _ = plane_panels(underlay, cam, spacing_xyz, at, toward_hgg)
    row, _ = _side_by_side(panels, max(p.shape[0] for p in panels))
    return np.round(row * 255).astype(np.uint8), at


def _font(size: int = FONT_PIXELS):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType, else its bitmap font


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def labelled_planes(
    underlay: np.ndarray,
    cam: np.ndarray,
    title: str,
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0),
    toward_hgg: bool = True,
    flat: bool | None = None,
) -> tuple[np.ndarray, list[str]]:
    """The picture a reader gets: `title` (wrapped to the width) above the three planes through
    the peak for the predicted grade, each named with the voxel it goes through and the patient's
    sides, and the colour bar with ticks in the map's units. A flat map (`is_flat`) is not drawn
    over the scan: the picture says it is flat. Returns uint8 RGB and every text drawn, in order."""
    from PIL import Image, ImageDraw

    flat = is_flat(cam, underlay != 0) if flat is None else flat  # `is_flat`, when already known
    panels, at, limit = plane_panels(underlay, cam, spacing_xyz, None, toward_hgg, overlay=not flat)
    height = max(p.shape[0] for p in panels)
    row, lefts = _side_by_side(panels, height)
    font, small = _font(), _font(FONT_PIXELS - 2)
    tick_width = int(max(small.getlength(t) for t in (f"+{limit:.2g}  HGG", f"-{limit:.2g}  LGG"))) + 8
    width = row.shape[1] + tick_width
    head = [title]
    if flat:
        head.append(
            f"Flat map: the model's evidence is one value ({float(np.asarray(cam)[at]):+.3g}) over the whole "
            "brain, so it shows nothing about where (as when the last feature map is a single cell: the "
            "strided layout at 32^3 and below); not drawn."
        )
    lines = [(line, i > 0) for i, text in enumerate(head) for line in _wrap(text, font, width - 8)]
    line_height = FONT_PIXELS + 4
    top = len(lines) * line_height + 6
    canvas = Image.new("RGB", (width, top + height + line_height + 4))
    canvas.paste(Image.fromarray(np.round(row * 255).astype(np.uint8)), (0, top))
    draw = ImageDraw.Draw(canvas)
    said = []
    for i, (line, warning) in enumerate(lines):
        draw.text(
            (4, 3 + i * line_height), line, fill=(255, 210, 80) if warning else (255, 255, 255), font=font
        )
        said.append(line)
    z, y, x = at
    captions = [(f"axial z={z}", "R", "L"), (f"coronal y={y}", "R", "L"), (f"sagittal x={x}", "A", "P")]
    below = top + height + 2
    for (name, left, right), x0, panel in zip(captions, lefts, panels):
        draw.text((x0 + (panel.shape[1] - font.getlength(name)) / 2, below), name, fill="white", font=font)
        mid = top + height // 2
        draw.text((x0 + 2, mid), left, fill=(120, 255, 120), font=small)
        draw.text(
            (x0 + panel.shape[1] - small.getlength(right) - 2, mid), right, fill=(120, 255, 120), font=small
        )
        said += [name, f"{left} {right}"]
    bar_right = lefts[-1] + BAR_PIXELS
    ticks = [(f"+{limit:.2g}  HGG", 0), ("0", height // 2), (f"-{limit:.2g}  LGG", height - 1)]
    for text, y_at in ticks:
        draw.line([(bar_right, top + y_at), (bar_right + 3, top + y_at)], fill="white")
        y_text = min(max(top + y_at - FONT_PIXELS // 2, top), top + height - FONT_PIXELS)
        draw.text((bar_right + 5, y_text), text, fill="white", font=small)
        said.append(text)
    unit = "logit/voxel"
    draw.text((bar_right + 5 - small.getlength(unit) / 2, below), unit, fill="white", font=small)
    return np.asarray(canvas), [*said, unit]


def write_png(path: str | Path, rgb: np.ndarray, text: dict[str, str] | None = None) -> Path:
    """A uint8 (H, W, 3) image as PNG, atomically, with `text` in its tEXt chunks (e.g. Title and
    Description: what the picture says, readable without looking at it)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    if not path.name.endswith(".png"):
        raise BratsError(f"{path}: a picture's file name must end in .png")
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def write_planes_png(
    path: str | Path,
    underlay: np.ndarray,
    cam: np.ndarray,
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0),
    toward_hgg: bool = True,
    title: str = "class activation map",
) -> tuple[Path, bool]:
    """`labelled_planes` written as a PNG, atomically, its words in the PNG's text chunks;
    returns the path and whether the map is flat."""
    flat = is_flat(cam, underlay != 0)
    rgb, said = labelled_planes(underlay, cam, title, spacing_xyz, toward_hgg, flat)
    write_png(path, rgb, {"Title": title, "Description": " | ".join(said)})
    return Path(path), flat


def lps_arrays(
    cam_image: sitk.Image, flair: sitk.Image
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """The FLAIR and the CAM on its grid as (z, y, x) LPS arrays, and their (x, y, z) spacing:
    whatever the file's orientation, drawn the same way round. Files already in LPS axes (as
    BraTS ships them) are not copied: the arrays are views, valid while the images live."""
    if np.allclose(flair.GetDirection(), np.eye(3).ravel(), atol=DIRECTION_ATOL):
        sx, sy, sz = (float(v) for v in flair.GetSpacing())
        return sitk.GetArrayViewFromImage(flair), sitk.GetArrayViewFromImage(cam_image), (sx, sy, sz)
    cam_lps = sitk.DICOMOrient(cam_image, ORIENTATION)  # permutes and flips only: no interpolation
    flair_lps = sitk.DICOMOrient(flair, ORIENTATION)
    sx, sy, sz = (float(v) for v in flair_lps.GetSpacing())
    return sitk.GetArrayFromImage(flair_lps), sitk.GetArrayFromImage(cam_lps), (sx, sy, sz)


def write_case_png(
    path: str | Path,
    cam_image: sitk.Image,
    flair: sitk.Image,
    toward_hgg: bool = True,
    title: str = "class activation map",
) -> tuple[Path, bool]:
    """Three planes through the CAM peak with the patient's FLAIR underneath, both on the FLAIR's
    own grid (`cam_on_reference`), shown in LPS axes whatever the file's orientation; returns the
    path and whether the map is flat."""
    flair_array, cam_array, spacing = lps_arrays(cam_image, flair)
    return write_planes_png(path, flair_array, cam_array, spacing, toward_hgg, title)
