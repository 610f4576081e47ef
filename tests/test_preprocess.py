import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from support import TINY_SIZE, write_nifti

from brats.data.cohort import MODALITIES, Case, find_cases
from brats.data.phantom import ORIGIN as PHANTOM_ORIGIN
from brats.data.preprocess import PreprocessConfig, brain_mask, preprocess_case
from brats.errors import CaseError

CFG = PreprocessConfig(size=TINY_SIZE)


def first_case(root) -> Case:
    return find_cases(root).cases[0]


def test_output_contract(cohort18):
    x = preprocess_case(first_case(cohort18), CFG)
    assert x.shape == (4, TINY_SIZE, TINY_SIZE, TINY_SIZE) and x.dtype == np.float32
    mask = brain_mask(list(x))
    assert 0.3 < mask.mean() < 0.95
    for c in range(4):
        assert x[c][mask].mean() == pytest.approx(0.0, abs=1e-5)
        assert x[c][mask].std() == pytest.approx(1.0, abs=1e-4)
        assert np.all(x[c][~mask] == 0)
    # the brain's bounding box fills the cube along its longest axis
    assert (
        mask.any(axis=(0, 1))[[0, -1]].any()
        or mask.any(axis=(1, 2))[[0, -1]].any()
        or mask.any(axis=(0, 2))[[0, -1]].any()
    )


def test_matches_sitk_resample(cohort18):
    """The separable fast path gives the values of sitk.Resample (linear, default 0)."""
    from brats.data.preprocess import brain_mask as bm
    from brats.data.preprocess import cube_grid, read_image, resample_any, resample_lps

    case = first_case(cohort18)
    images = [read_image(case, m) for m in MODALITIES]
    mask = bm([sitk.GetArrayViewFromImage(i) for i in images])
    origin, spacing = cube_grid(images[0], mask, 20)
    np.testing.assert_allclose(
        resample_lps(images, origin, spacing, 20), resample_any(images, origin, spacing, 20), atol=1e-3
    )


def reoriented_copy(case: Case, tmp_path, order, flips) -> Case:
    """Store the same patient in another orientation (axes permuted and flipped)."""
    paths = []
    for p in case.paths:
        img = sitk.ReadImage(str(p))
        img = sitk.Flip(sitk.PermuteAxes(img, order), flips)
        out = tmp_path / p.name
        sitk.WriteImage(img, str(out))
        paths.append(out)
    return Case(case.patient_id, case.label, tuple(paths))


def test_orientation_is_canonical(cohort18, tmp_path):
    case = first_case(cohort18)
    ras = reoriented_copy(case, tmp_path, (1, 0, 2), (True, True, False))
    assert sitk.ReadImage(str(ras.paths[0])).GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1)
    np.testing.assert_allclose(preprocess_case(ras, CFG), preprocess_case(case, CFG), atol=1e-4)


def copy_case(case: Case, tmp_path) -> Case:
    paths = []
    for p in case.paths:
        shutil.copy(p, tmp_path / p.name)
        paths.append(tmp_path / p.name)
    return Case(case.patient_id, case.label, tuple(paths))


def test_shape_mismatch(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    write_nifti(case.path("t2"), np.ones((10, 12, 14), np.int16))
    with pytest.raises(
        CaseError, match=f"^{case.patient_id}: t2 file .*_t2.nii.gz has shape \\(14, 12, 10\\)"
    ):
        preprocess_case(case, CFG)


def test_spacing_mismatch(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    img = sitk.ReadImage(str(case.path("flair")))
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(case.path("flair")))
    with pytest.raises(CaseError, match="flair file .* has spacing .* co-registered"):
        preprocess_case(case, CFG)


def test_orientation_mismatch(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    img = sitk.ReadImage(str(case.path("t1ce")))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(case.path("t1ce")))
    with pytest.raises(CaseError, match="t1ce file .* has an orientation \\(direction\\) different from t1"):
        preprocess_case(case, CFG)


def test_nan_voxels(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case.path("t1")))).astype(np.float32)
    arr[5, 5, 5] = np.nan
    write_nifti(case.path("t1"), arr)
    with pytest.raises(CaseError, match="t1 file .* has NaN or Inf voxels"):
        preprocess_case(case, CFG)


def test_empty_brain(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    for p in case.paths:
        write_nifti(p, np.zeros((28, 40, 40), np.int16))
    with pytest.raises(CaseError, match=f"{case.patient_id}: empty brain"):
        preprocess_case(case, CFG)


@pytest.mark.parametrize("dims", [2, 4])
def test_not_3d(cohort18, tmp_path, dims):
    case = copy_case(first_case(cohort18), tmp_path)
    shape = (40, 40) if dims == 2 else (2, 28, 40, 40)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(shape, np.int16), isVector=False), str(case.path("t1ce")))
    with pytest.raises(CaseError, match=f"t1ce file .* is {dims}D .*need one 3D scalar volume"):
        preprocess_case(case, CFG)


def test_not_an_image_and_corrupt_gzip(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    case.path("t2").write_bytes(b"this is not a nifti file")
    with pytest.raises(CaseError, match="cannot read t2 file .*_t2.nii.gz: not a NIfTI image"):
        preprocess_case(case, CFG)
    data = case.path("flair").read_bytes()
    case.path("flair").write_bytes(data[: len(data) // 2])  # truncated gzip
    shutil.copy(first_case(cohort18).path("t2"), case.path("t2"))
    with pytest.raises(CaseError, match="cannot read flair file"):
        preprocess_case(case, CFG)


def test_plain_file_reads_as_simpleitk_reads_it(cohort18):
    """The verified reader gives SimpleITK's image for a plain file: same voxels, type and geometry."""
    from brats.data.preprocess import read_image

    case = first_case(cohort18)
    for mod in MODALITIES:
        ours, itk = read_image(case, mod), sitk.ReadImage(str(case.path(mod)))
        assert ours.GetPixelID() == itk.GetPixelID() and ours.GetSize() == itk.GetSize()
        assert ours.GetOrigin() == itk.GetOrigin() and ours.GetSpacing() == itk.GetSpacing()
        assert ours.GetDirection() == itk.GetDirection()
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(itk))


def test_all_zero_modality(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    write_nifti(case.path("t2"), np.zeros((28, 40, 40), np.int16), origin=PHANTOM_ORIGIN)
    with pytest.raises(CaseError, match=f"^{case.patient_id}: t2 file .*_t2.nii.gz: all voxels are 0"):
        preprocess_case(case, CFG)


def test_values_beyond_float32(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case.path("flair")))).astype(np.float64) * 1e36
    write_nifti(case.path("flair"), arr)  # up to ~3e40: not even representable in float32
    with pytest.raises(CaseError, match=f"^{case.patient_id}: flair file .*_flair.nii.gz has values up to"):
        preprocess_case(case, CFG)


def test_nan_in_float64_file(cohort18, tmp_path):
    case = copy_case(first_case(cohort18), tmp_path)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case.path("t2")))).astype(np.float64)
    arr[3, 4, 5] = np.inf
    write_nifti(case.path("t2"), arr)
    with pytest.raises(CaseError, match="t2 file .* has NaN or Inf voxels"):
        preprocess_case(case, CFG)


def gzip_backends():
    import zlib

    backends = [zlib]
    try:
        from isal import isal_zlib

        backends.append(isal_zlib)
    except ImportError:
        pass
    return backends


@pytest.mark.parametrize("zlib_module", gzip_backends(), ids=lambda m: m.__name__)
def test_inflate_checks_every_member(zlib_module):
    """Every member is decompressed and checked (CRC-32, length), with either library."""
    import gzip

    from brats.io.compression import UnusableFile, inflate

    data = np.random.default_rng(0).integers(0, 50, 300_000, dtype=np.uint8).tobytes()
    one, two = gzip.compress(data[:1000]), gzip.compress(data[1000:])
    assert inflate(one + two + bytes(7), zlib_module) == data  # zero padding after the end is fine
    bad_crc = two[:-8] + bytes([two[-8] ^ 1]) + two[-7:]
    bad_length = two[:-1] + bytes([two[-1] ^ 1])
    for damaged, what in [
        (one + bad_crc, "corrupt"),
        (one + bad_length, "corrupt"),
        (one + two[:-4], "truncated"),
        (one + two[: len(two) // 2], "truncated"),
        (one + two + b"junk", "corrupt"),
    ]:
        with pytest.raises(UnusableFile, match=what):
            inflate(damaged, zlib_module)


def test_crc_error_in_a_real_size_file(tmp_path):
    """ITK reads a real-size file whose gzip CRC does not match without a word (one voxel differs)."""
    import gzip

    from brats.data.preprocess import read_image

    vol = np.random.default_rng(1).integers(0, 1000, (64, 128, 128)).astype(np.int16)
    write_nifti(tmp_path / "good.nii.gz", vol)
    good = (tmp_path / "good.nii.gz").read_bytes()
    raw = bytearray(gzip.decompress(good))
    raw[len(raw) // 2] ^= 0x40
    (tmp_path / "P_t1.nii.gz").write_bytes(gzip.compress(bytes(raw))[:-8] + good[-8:])
    case = Case("P", None, (tmp_path / "P_t1.nii.gz",) * 4)
    with pytest.raises(CaseError, match="^P: cannot read t1 file .*P_t1.nii.gz: corrupt gzip data"):
        read_image(case, "t1")
