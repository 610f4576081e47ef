"""Mapping a CAM from the model's cube back onto the patient's scan, and drawing it (no torch)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from support import TINY_SHAPE, write_nifti

from brats.data.cohort import MODALITIES, Case, find_cases
from brats.data.phantom import make_cohort, make_patient_with_lesion
from brats.data.preprocess import CubeGrid, PreprocessConfig, preprocess_with_grid
from brats.deploy.cam import (
    BAR_PIXELS,
    GAP_PIXELS,
    HGG_RGB,
    LGG_RGB,
    PLANE_PIXELS,
    cam_on_reference,
    cam_path,
    cube_image,
    is_flat,
    labelled_planes,
    peak_index,
    render_planes,
    write_case_cam,
    write_case_png,
    write_planes_png,
)
from brats.errors import BratsError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 20  # cube side
SHAPE_ZYX = (18, 26, 22)
SPACING = (1.1, 0.9, 1.6)  # x, y, z mm: anisotropic, so that axes cannot be swapped unnoticed
ORIGIN = (12.0, -30.0, 7.5)
SPOT_ZYX = (6, 9, 14)  # a bright spot in the FLAIR, off-centre on every axis


def rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


DIRECTIONS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),  # as NIfTI files from RAS tools usually are
    "oblique": rotation(25.0, 15.0),
}


def write_case(folder: Path, direction: np.ndarray) -> Case:
    """A phantom patient: an ellipsoidal brain, and a bright spot in the FLAIR."""
    z, y, x = np.indices(SHAPE_ZYX, dtype=np.float64)
    centre = (np.array(SHAPE_ZYX) - 1) / 2
    brain = ((z - centre[0]) / 7.5) ** 2 + ((y - centre[1]) / 11) ** 2 + ((x - centre[2]) / 9) ** 2 < 1
    paths = []
    for i, modality in enumerate(MODALITIES):
        array = np.where(brain, 100.0 + 10 * i + 0.5 * x, 0.0).astype(np.float32)
        if modality == "flair":
            zs, ys, xs = SPOT_ZYX
            array[zs - 1 : zs + 2, ys - 1 : ys + 2, xs - 1 : xs + 2] = 2000.0
        path = folder / f"P1_{modality}.nii.gz"
        write_nifti(path, array, spacing=SPACING, direction=tuple(direction.ravel()))
        img = sitk.ReadImage(str(path))
        img.SetOrigin(ORIGIN)
        sitk.WriteImage(img, str(path))
        paths.append(path)
    return Case("P1", None, tuple(paths))


def cube_indices(reference: sitk.Image, grid: CubeGrid) -> np.ndarray:
    """For every voxel of `reference`, its continuous (x, y, z) index in the cube: (z, y, x, 3).

    Computed from the header with numpy (physical point = origin + D diag(spacing) index), apart
    from ITK, so that the test does not check ITK against itself."""
    size_x, size_y, size_z = reference.GetSize()
    z, y, x = np.meshgrid(np.arange(size_z), np.arange(size_y), np.arange(size_x), indexing="ij")
    index = np.stack([x, y, z], axis=-1).astype(np.float64)  # (z, y, x, 3) in x, y, z order
    d = np.array(reference.GetDirection()).reshape(3, 3)
    physical = np.array(reference.GetOrigin()) + index * np.array(reference.GetSpacing()) @ d.T
    return (physical - np.array(grid.origin)) / grid.spacing_mm


@pytest.fixture(params=sorted(DIRECTIONS))
def patient(request, tmp_path) -> tuple[Case, sitk.Image, np.ndarray, CubeGrid]:
    case = write_case(tmp_path, DIRECTIONS[request.param])
    volume, grid = preprocess_with_grid(case, PreprocessConfig(size=SIZE))
    return case, sitk.ReadImage(str(case.path("flair"))), volume, grid


def test_marked_block_maps_onto_the_original_voxels_it_came_from(patient):
    case, reference, _, grid = patient
    lo, hi = np.array([5, 7, 4]), np.array([9, 12, 8])  # x, y, z cube indices, inclusive
    cam = np.zeros((SIZE,) * 3, np.float32)
    cam[lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1] = 1.0
    mapped = cam_on_reference(cam, grid, reference)
    for get in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(mapped, get)() == pytest.approx(getattr(reference, get)())
    values = sitk.GetArrayFromImage(mapped)
    c = cube_indices(reference, grid)
    eps = 1e-6
    inside = np.all((c >= lo + eps) & (c <= hi - eps), axis=-1)  # every interpolation neighbour marked
    outside = np.any((c <= lo - 1 - eps) | (c >= hi + 1 + eps), axis=-1)  # no neighbour marked
    assert inside.sum() >= 20 and outside.sum() > 0.8 * values.size
    np.testing.assert_allclose(values[inside], 1.0, atol=1e-5)
    np.testing.assert_allclose(values[outside], 0.0, atol=1e-6)
    between = ~inside & ~outside
    assert np.all((values[between] >= -1e-6) & (values[between] <= 1 + 1e-6))


def test_cube_of_the_scan_maps_back_onto_the_scan(patient):
    """The grid is the one preprocessing used: its FLAIR channel, mapped back, peaks on the spot."""
    case, reference, volume, grid = patient
    mapped = sitk.GetArrayFromImage(cam_on_reference(volume[MODALITIES.index("flair")], grid, reference))
    peak = np.unravel_index(np.argmax(mapped), mapped.shape)
    assert np.abs(np.array(peak) - SPOT_ZYX).max() <= 1, (peak, SPOT_ZYX)
    # The t1 rises along the file's own x axis: mapped back, it rises the same way.
    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(case.path("t1"))))
    t1_back = sitk.GetArrayFromImage(cam_on_reference(volume[0], grid, reference))
    interior = ndimage.binary_erosion(t1 != 0, iterations=2)
    assert np.corrcoef(t1_back[interior], t1[interior])[0, 1] > 0.95


def test_writes_nifti_with_the_reference_geometry(patient, tmp_path):
    case, reference, volume, grid = patient
    out = tmp_path / "cams"
    written = write_case_cam(out, case.patient_id, volume[0], grid, reference)
    assert written == cam_path(out, "P1") == out / "P1_cam.nii.gz"
    assert sorted(p.name for p in out.iterdir()) == ["P1_cam.nii.gz"]  # no temp file left
    back = sitk.ReadImage(str(written))
    assert back.GetPixelID() == sitk.sitkFloat32
    for get in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(back, get)() == pytest.approx(getattr(reference, get)(), abs=1e-5)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(cam_on_reference(volume[0], grid, reference))
    )


def test_failed_write_keeps_the_old_file(patient, tmp_path):
    case, reference, volume, grid = patient
    out = tmp_path / "cams"
    written = write_case_cam(out, "P1", volume[0], grid, reference)
    before = written.read_bytes()
    with pytest.raises(BratsError, match="does not fit a cube grid"):
        write_case_cam(out, "P1", volume[0, :-1], grid, reference)
    assert written.read_bytes() == before and [p.name for p in out.iterdir()] == ["P1_cam.nii.gz"]


def test_png_through_the_peak_over_the_flair(patient, tmp_path):
    case, reference, volume, grid = patient
    out = tmp_path / "png" / "P1_cam.png"
    png, flat = write_case_png(
        out, cam_on_reference(volume[3], grid, reference), reference, title="P1: p 0.7"
    )
    assert png == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not flat
    assert [p.name for p in out.parent.iterdir()] == ["P1_cam.png"]
    drawn = sitk.ReadImage(str(png))
    assert drawn.GetNumberOfComponentsPerPixel() == 3 and drawn.GetSize()[1] >= PLANE_PIXELS
    pixels = sitk.GetArrayFromImage(drawn)  # (H, W, 3)
    assert (pixels.max(axis=2) == 0).mean() > 0.2 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    said = png_text(png)
    assert said["Title"] == "P1: p 0.7" and "Flat map" not in said["Description"]
    words = said["Description"].split(" | ")
    assert words[0] == "P1: p 0.7" and [w.split("=")[0] for w in words[1:7:2]] == [
        "axial z",
        "coronal y",
        "sagittal x",
    ]
    assert words[2:7:2] == ["R L", "R L", "A P"] and words[-1] == "logit/voxel"
    limit = float(np.abs(sitk.GetArrayFromImage(cam_on_reference(volume[3], grid, reference))).max())
    assert words[-4:-1] == [f"+{limit:.2g}  HGG", "0", f"-{limit:.2g}  LGG"]


def png_text(path):
    from PIL import Image

    with Image.open(path) as image:
        return dict(image.text)


def test_a_flat_map_says_so_and_is_not_drawn_over_the_scan(tmp_path):
    """As the strided layout's map at 32^3: one value over the brain. The picture says it and
    shows the scan without a red wash; a map with a place keeps its overlay."""
    underlay = np.zeros((12, 14, 16), np.float32)
    underlay[2:-2, 2:-2, 2:-2] = np.random.default_rng(0).uniform(50, 150, (8, 10, 12))
    flat = np.full(underlay.shape, 3.15, np.float32)
    assert is_flat(flat, underlay != 0) and not is_flat(flat + (underlay > 100), underlay != 0)
    path, was_flat = write_planes_png(tmp_path / "f.png", underlay, flat, title="P2: p(HGG) 0.96, graded HGG")
    said = png_text(path)["Description"]
    assert was_flat and "Flat map: the model's evidence is one value (+3.15)" in said
    red = {}
    for name, cam in (("flat", flat), ("placed", flat * (underlay > 100))):
        drawn, _ = labelled_planes(underlay, cam, "t")
        planes = drawn[:, : render_planes(underlay, cam)[0].shape[1] - BAR_PIXELS - GAP_PIXELS].astype(int)
        red[name] = ((planes[..., 0] - planes[..., 1] > 60) & (planes[..., 0] - planes[..., 2] > 60)).sum()
    assert red["flat"] == 0 and red["placed"] > 100  # no red wash; a map with a place is drawn
    _, placed = write_planes_png(tmp_path / "g.png", underlay, flat * (underlay > 100))
    assert not placed and "Flat map" not in png_text(tmp_path / "g.png")["Description"]


def test_peak_is_the_centre_of_a_plateau_and_can_be_kept_inside_a_mask():
    cam = np.zeros((6, 7, 8), np.float32)
    cam[0:3, 0:3, 0:5] = 2.0  # a flat top, as an upsampled coarse map has at its edges
    cam[5, 6, 7] = -3.0
    assert peak_index(cam) == (1, 1, 2)
    assert peak_index(cam, toward_hgg=False) == (5, 6, 7)
    cam[4, 4, 4] = 1.0
    within = np.zeros(cam.shape, bool)
    within[4:, 4:, 4:] = True  # excludes the flat top
    assert peak_index(cam, within=within) == (4, 4, 4)
    assert peak_index(cam, toward_hgg=False, within=within) == (5, 6, 7)
    with pytest.raises(BratsError, match="same 3D shape"):
        write_planes_png(Path("unused.png"), np.zeros((6, 7, 8)), np.zeros((6, 7, 9)))


def test_planes_show_hgg_evidence_red_lgg_blue_in_square_pixels():
    """A map with an HGG blob and an LGG blob over a uniform brain: the planes go through the
    peak for the grade asked for, coloured by sign, and anisotropic voxels are drawn to scale."""
    shape = (10, 20, 30)  # z, y, x
    underlay = np.zeros(shape, np.float32)
    underlay[1:-1, 2:-2, 2:-2] = 100.0
    cam = np.zeros(shape, np.float32)
    cam[3:6, 4:8, 5:9] = 2.0  # HGG evidence
    cam[6:9, 12:16, 20:25] = -1.0  # LGG evidence
    spacing = (1.0, 1.0, 3.0)  # x, y, z mm: a slice 3 voxels thick
    rgb, at = render_planes(underlay, cam, spacing)
    assert at == peak_index(cam) and cam[at] == 2.0
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    scale = -(-PLANE_PIXELS // 30)  # the 30 mm tall sagittal and coronal planes set the magnification
    assert rgb.shape[0] == 30 * scale  # 10 slices of 3 mm
    red = (rgb[..., 0].astype(int) - rgb[..., 2] > 60).sum()
    blue = (rgb[..., 2].astype(int) - rgb[..., 0] > 60).sum()
    assert red > 0 and blue == 0 or red > blue  # through the HGG blob: mostly red
    _, at_lgg = render_planes(underlay, cam, spacing, toward_hgg=False)
    assert cam[at_lgg] == -1.0
    rgb_lgg, _ = render_planes(underlay, cam, spacing, at=at_lgg)
    blue = (rgb_lgg[..., 2].astype(int) - rgb_lgg[..., 0] > 60).sum()
    assert blue > 0
    # colour bar: HGG colour at the top, LGG colour at the bottom, in the rightmost column
    np.testing.assert_allclose(rgb[0, -1] / 255, HGG_RGB, atol=0.01)
    np.testing.assert_allclose(rgb[-1, -1] / 255, LGG_RGB, atol=0.01)
    assert np.all(rgb[0, 0] == 0)  # background black


def test_cube_image_checks_the_shape():
    with pytest.raises(BratsError, match=r"CAM of shape \(4, 4, 5\) does not fit a cube grid of 4\^3"):
        cube_image(np.zeros((4, 4, 5), np.float32), CubeGrid((0.0, 0.0, 0.0), 1.0, 4))


NO_TORCH = """
import sys
sys.modules["torch"] = sys.modules["matplotlib"] = None  # any import of either now fails
import numpy as np, SimpleITK as sitk
from brats.deploy.cam import cam_on_reference, write_case_png
from brats.data.preprocess import CubeGrid
grid = CubeGrid((0.0, 0.0, 0.0), 2.0, 8)
reference = sitk.Image(12, 10, 9, sitk.sitkFloat32)
reference += 1.0
cam = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
write_case_png(sys.argv[1], cam_on_reference(cam, grid, reference), reference)
print(any(sys.modules.get(m) is not None for m in ("torch", "matplotlib")))
"""


def test_works_without_torch_or_matplotlib(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False" and (tmp_path / "x.png").is_file()


def test_synthetic_tumour_marked_in_the_cube_maps_back_onto_the_tumour(tmp_path):
    """A map that is the phantom's known lesion, as preprocessing puts it in the cube, lands
    back on that lesion in the patient's own file."""
    made = make_cohort(tmp_path / "c", 2, seed=5, shape=TINY_SHAPE, workers=1)
    index, pid = next((i, pid) for i, (pid, label) in enumerate(made) if label == 1)
    case = next(c for c in find_cases(tmp_path / "c").cases if c.patient_id == pid)
    volumes, lesion = make_patient_with_lesion(5, index, True, TINY_SHAPE)
    for modality, volume in zip(MODALITIES, volumes):  # the very patient make_cohort wrote
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(case.path(modality)))), volume
        )
    assert set(np.unique(lesion)) == {0, 1, 2} and np.all(volumes[0][lesion > 0] != 0)  # inside the brain
    flair = volumes[MODALITIES.index("flair")]
    assert np.median(flair[lesion > 0]) > 1.5 * np.median(flair[(lesion == 0) & (flair != 0)])

    # The lesion in place of the t2: preprocessing resamples it as it does the images.
    marked = tmp_path / "marked"
    marked.mkdir()
    reference = sitk.ReadImage(str(case.path("flair")))
    paths = []
    for modality in MODALITIES:
        image = sitk.ReadImage(str(case.path(modality)))
        if modality == "t2":
            image = sitk.GetImageFromArray(np.where(lesion > 0, 1000, 0).astype(np.int16))
            image.CopyInformation(reference)
        paths.append(marked / f"{pid}_{modality}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    volume, grid = preprocess_with_grid(Case(pid, 1, tuple(paths)), PreprocessConfig(size=32))
    cube = volume[MODALITIES.index("t2")]  # z-scored: the lesion high, the rest of the brain low
    back = sitk.GetArrayFromImage(cam_on_reference(cube, grid, reference))
    found = back > (cube.max() + cube.min()) / 2
    dice = 2 * (found & (lesion > 0)).sum() / (found.sum() + (lesion > 0).sum())
    assert dice > 0.8, dice
    print(f"dice {dice:.3f}")
