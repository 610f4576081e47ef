"""Real-world NIfTI forms read like a plain file; damaged files fail with one line naming patient + file.

Each form stores one patient's t1ce the way some real tool or release does (built with nibabel or
by editing the bytes exactly as those tools write them); the whole patient must preprocess to the
same values as the plain file. Each damaged form must give a CaseError naming patient, file and fix.
"""

from __future__ import annotations

import gzip
import re
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from support import TINY_SIZE

from brats.data.cache_builder import prepare
from brats.data.cohort import MODALITIES, Case, find_cases
from brats.data.preprocess import PreprocessConfig, preprocess_case, read_image
from brats.errors import CaseError

CFG = PreprocessConfig(size=TINY_SIZE)
MOD = "t1ce"  # the modality each test rewrites


@pytest.fixture(scope="module")
def plain(cohort18) -> tuple[Case, np.ndarray]:
    case = find_cases(cohort18).cases[0]
    return case, preprocess_case(case, CFG)


def copy_with(case: Case, folder: Path, name: str, data: bytes) -> Case:
    """The patient with its t1ce replaced by `data` stored as `name` (other files copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for mod, p in zip(MODALITIES, case.paths):
        if mod == MOD:
            (folder / name).write_bytes(data)
            paths.append(folder / name)
        else:
            paths.append(Path(shutil.copy(p, folder / p.name)))
    return Case(case.patient_id, case.label, tuple(paths))


def raw_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def saved(img: nib.spatialimages.SpatialImage, path: Path) -> bytes:
    nib.save(img, path)
    return path.read_bytes()


def with_extension(src: Path, tmp: Path) -> bytes:
    """A header extension, as in official BraTS 2018 files (~2.6 KB of XML after the header)."""
    img = nib.load(src)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"<xml>" + b"x" * 2600 + b"</xml>"))
    return saved(img, tmp / "ext.nii.gz")


def with_vox_offset_zero(src: Path, tmp: Path) -> bytes:
    """vox_offset stored as 0: the data still starts right after the 352-byte header."""
    raw = bytearray(raw_bytes(src))
    raw[108:112] = struct.pack("<f", 0.0)
    return gzip.compress(bytes(raw))


def as_nifti2(src: Path, tmp: Path) -> bytes:
    return saved(nib.Nifti2Image.from_image(nib.load(src)), tmp / "n2.nii.gz")


def as_nifti2_uncompressed(src: Path, tmp: Path) -> bytes:
    return saved(nib.Nifti2Image.from_image(nib.load(src)), tmp / "n2.nii")


def uncompressed(src: Path, tmp: Path) -> bytes:
    return saved(nib.load(src), tmp / "plain.nii")


def multi_member(src: Path, tmp: Path) -> bytes:
    """Two gzip members back to back (what `cat a.gz b.gz` or a parallel compressor writes)."""
    raw = raw_bytes(src)
    cut = len(raw) // 3
    return gzip.compress(raw[:cut]) + gzip.compress(raw[cut:])


def big_endian(src: Path, tmp: Path) -> bytes:
    img = nib.load(src)
    header = img.header.as_byteswapped(">")
    return saved(nib.Nifti1Image(np.asarray(img.dataobj), None, header), tmp / "be.nii.gz")


FORMS = {
    "header extension": (with_extension, "{pid}_t1ce.nii.gz"),
    "vox_offset 0": (with_vox_offset_zero, "{pid}_t1ce.nii.gz"),
    "NIfTI-2": (as_nifti2, "{pid}_t1ce.nii.gz"),
    "NIfTI-2 .nii": (as_nifti2_uncompressed, "{pid}_t1ce.nii"),
    "uncompressed .nii": (uncompressed, "{pid}_t1ce.nii"),
    "multi-member gzip": (multi_member, "{pid}_t1ce.nii.gz"),
    "big-endian": (big_endian, "{pid}_t1ce.nii.gz"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_real_form_reads_like_the_plain_file(plain, tmp_path, form):
    case, expected = plain
    make, name = FORMS[form]
    data = make(case.path(MOD), tmp_path)
    other = copy_with(case, tmp_path / "case", name.format(pid=case.patient_id), data)
    reference = sitk.ReadImage(str(case.path(MOD)))
    image = read_image(other, MOD)
    assert image.GetSize() == reference.GetSize() and image.GetPixelID() == reference.GetPixelID()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(preprocess_case(other, CFG), expected)


def test_discovery_finds_real_forms(plain, tmp_path):
    """A folder holding these forms (.nii and .nii.gz mixed) is found and graded as one patient."""
    case, expected = plain
    folder = tmp_path / case.patient_id
    folder.mkdir()
    for mod, p in zip(MODALITIES, case.paths):
        if mod == "t2":
            (folder / f"{case.patient_id}_t2.nii").write_bytes(raw_bytes(p))
        elif mod == MOD:
            (folder / f"{case.patient_id}_t1ce.nii.gz").write_bytes(as_nifti2(p, tmp_path))
        else:
            shutil.copy(p, folder / p.name)
    (found,) = find_cases(folder, labelled=False).cases
    np.testing.assert_array_equal(preprocess_case(found, CFG), expected)


def test_scaled_file_gives_the_scaled_values(plain, tmp_path):
    """scl_slope/scl_inter apply: the same values as a float file holding the scaled voxels."""
    case, expected = plain
    raw = bytearray(raw_bytes(case.path(MOD)))
    raw[112:120] = struct.pack("<ff", 2.0, 0.0)
    scaled = copy_with(case, tmp_path / "scaled", case.path(MOD).name, gzip.compress(bytes(raw)))
    img = sitk.ReadImage(str(case.path(MOD)))
    values = sitk.Cast(img, sitk.sitkFloat32) * 2.0
    values.CopyInformation(img)
    sitk.WriteImage(values, str(tmp_path / "float.nii.gz"))
    reference = copy_with(
        case, tmp_path / "float", case.path(MOD).name, (tmp_path / "float.nii.gz").read_bytes()
    )
    got = preprocess_case(scaled, CFG)
    np.testing.assert_array_equal(got, preprocess_case(reference, CFG))
    np.testing.assert_allclose(got, expected, atol=1e-5)  # z-scores do not depend on the scale


def test_prepare_keeps_a_patient_with_header_extensions(cohort_copy, tmp_path):
    """The official BraTS 2018 form (header extension) is prepared, not refused as truncated."""
    case = find_cases(cohort_copy).cases[0]
    data = with_extension(case.path(MOD), tmp_path)
    case.path(MOD).write_bytes(data)
    result = prepare(find_cases(cohort_copy).cases, tmp_path / "cache", CFG, workers=1, progress=False)
    assert not result.failed and case.patient_id in result.written


# --- damaged files -------------------------------------------------------------------------------


def crc_error_mid_stream(src: Path) -> bytes:
    """A valid deflate stream whose data differ from what the (intact) trailer records: what a
    flipped bit on disk or in transfer leaves; `gzip -t` reports a CRC error, readers that skip the
    check return wrong voxels."""
    good = src.read_bytes()
    raw = bytearray(gzip.decompress(good))
    raw[len(raw) // 2] ^= 0x40
    return gzip.compress(bytes(raw), mtime=0)[:-8] + good[-8:]


def truncated_gzip(src: Path) -> bytes:
    data = src.read_bytes()
    return data[: len(data) // 2]


def trailer_cut(src: Path) -> bytes:
    return src.read_bytes()[:-3]


def truncated_nii(src: Path) -> bytes:
    raw = raw_bytes(src)
    return raw[: len(raw) - 1000]


def garbage(src: Path) -> bytes:
    return np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()


def garbage_after_gzip_magic(src: Path) -> bytes:
    return b"\x1f\x8b\x08\x00" + garbage(src)


DAMAGED = {
    "CRC error mid-stream": (crc_error_mid_stream, ".nii.gz", "corrupt.*re-copy or re-download"),
    "truncated gzip": (truncated_gzip, ".nii.gz", "truncated.*re-copy or re-download"),
    "gzip trailer cut": (trailer_cut, ".nii.gz", "truncated.*re-copy or re-download"),
    "truncated .nii": (truncated_nii, ".nii", "truncated.*re-copy or re-download"),
    "garbage": (garbage, ".nii.gz", "not a NIfTI image"),
    "garbage after gzip magic": (garbage_after_gzip_magic, ".nii.gz", "corrupt.*re-copy or re-download"),
}


@pytest.mark.parametrize("form", list(DAMAGED))
def test_damaged_file_is_one_line_naming_patient_and_file(plain, tmp_path, form):
    case, _ = plain
    make, suffix, advice = DAMAGED[form]
    name = f"{case.patient_id}_t1ce{suffix}"
    bad = copy_with(case, tmp_path / "case", name, make(case.path(MOD)))
    with pytest.raises(CaseError) as e:
        preprocess_case(bad, CFG)
    msg = str(e.value)
    assert msg.startswith(f"{case.patient_id}: cannot read t1ce file {bad.path(MOD)}"), msg
    assert "\n" not in msg
    assert re.search(advice, msg), msg


def test_damaged_headers_never_crash(plain, tmp_path):
    """Random damage to header fields gives a result or one line naming patient and file, never a
    traceback (wrong dims, data types, offsets, spacings, directions, magic)."""
    case, _ = plain
    raw = raw_bytes(case.path(MOD))
    rng = np.random.default_rng(7)
    fields = [0, 40, 42, 44, 46, 48, 70, 72, 76, 80, 108, 112, 116, 252, 254, 256, 280, 296, 312, 344]
    failed = 0
    for i in range(40):
        damaged = bytearray(raw)
        for at in rng.choice(fields, size=2, replace=False):
            damaged[at : at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        bad = copy_with(case, tmp_path / str(i), case.path(MOD).name, gzip.compress(bytes(damaged)))
        try:
            preprocess_case(bad, CFG)
        except CaseError as e:
            failed += 1
            assert str(e).startswith(f"{case.patient_id}: ") and str(bad.path(MOD)) in str(e), e
            assert "\n" not in str(e)
    assert failed > 20  # most of this damage must be noticed
