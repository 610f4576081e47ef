"""Never destroy a user's file, never score the wrong model: every case is a file a user has, and
the command refuses it in one line before doing any work, leaving every file as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import one_line_error, run_cli
from support import TINY_SHAPE, copy_run

from brats.data.phantom import make_cohort


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_patients(tmp_path: Path, n: int = 2) -> Path:
    new = tmp_path / "new"
    make_cohort(new, n, seed=5, shape=TINY_SHAPE, prefix="NEW", workers=1)
    return new


def first_case(cohort: Path) -> Path:
    return sorted(p for g in ("HGG", "LGG") if (cohort / g).is_dir() for p in (cohort / g).iterdir())[0]


# --- 1. outputs never destroy inputs


@pytest.fixture
def model_copy(exported, tmp_path) -> Path:
    model = tmp_path / "m.onnx"
    shutil.copy(exported[1], model)
    return model


def test_predict_out_never_replaces_the_model_or_a_scan(model_copy, tmp_path, capsys):
    new = new_patients(tmp_path)
    t1 = next(first_case(new).glob("*_t1.nii.gz"))
    link = tmp_path / "link.csv"
    link.symlink_to(model_copy)
    hard = tmp_path / "hard.csv"
    os.link(t1, hard)
    before = {p: digest(p) for p in (model_copy, t1)}
    for out, what in (
        (model_copy, "the model"),
        (link, "the model"),
        (t1, "'s t1 scan"),
        (hard, "'s t1 scan"),
    ):
        r = run_cli(capsys, "predict.py", model_copy, new, "--out", out)
        err = one_line_error(r)
        assert what in err and "choose another path" in err, err
        assert "patient(s)" not in r.out  # refused before any patient was read
    assert {p: digest(p) for p in before} == before


def test_predict_out_replaces_only_a_predictions_csv(model_copy, tmp_path, capsys):
    new = new_patients(tmp_path)
    notes = tmp_path / "notes.csv"
    notes.write_text("my notes, not predictions\n")
    err = one_line_error(run_cli(capsys, "predict.py", model_copy, new, "--out", notes))
    assert "is not a predictions CSV" in err and str(notes) in err
    assert notes.read_text() == "my notes, not predictions\n"


def test_predict_cam_folder_is_never_a_patients_folder(model_copy, tmp_path, capsys):
    new = new_patients(tmp_path)
    case = first_case(new)
    files = sorted(p.name for p in case.iterdir())
    err = one_line_error(
        run_cli(capsys, "predict.py", model_copy, new, "--cam", case, "--out", tmp_path / "p.csv")
    )
    assert "--cam" in err and "folder" in err
    assert sorted(p.name for p in case.iterdir()) == files


def test_export_out_never_replaces_a_checkpoint_or_another_file(exported, tmp_path, capsys):
    run = copy_run(exported[0], tmp_path / "run")
    best = run / "fold_0" / "best_ema.pt"
    before = digest(best)
    link = tmp_path / "x.onnx"
    link.symlink_to(best)
    other = tmp_path / "y.onnx"
    other.write_text("not a model")
    card = tmp_path / "z_card.json"
    card.write_text('{"mine": 1}')
    for out, said in (
        (best, "ends in .onnx"),
        (link, "fold 0's best_ema.pt"),
        (other, "is not an ONNX model"),
        (tmp_path / "z.onnx", "is not a model card"),
    ):
        r = run_cli(capsys, "export.py", "--run", run, "--fold", "1", "--out", out)
        assert said in one_line_error(r), r.err
    assert digest(best) == before and other.read_text() == "not a model" and card.read_text() == '{"mine": 1}'


def test_evaluate_never_writes_into_the_cache_through_a_link(cv_run, cache20, tmp_path, capsys):
    run = copy_run(cv_run, tmp_path / "run")
    (run / "evaluation").symlink_to(cache20, target_is_directory=True)
    listing = sorted(p.name for p in cache20.iterdir())
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", run, "--folds", "0"))
    assert "the cache" in err and "evaluation folder" in err
    assert sorted(p.name for p in cache20.iterdir()) == listing


# --- 2. a transactional cache


def cohort_and_cache(tmp_path: Path, n: int = 6) -> tuple[Path, Path]:
    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig

    cohort = tmp_path / "cohort"
    make_cohort(cohort, n, seed=4, shape=TINY_SHAPE, workers=1)
    prepare(
        find_cases(cohort).cases,
        tmp_path / "cache",
        PreprocessConfig(size=TINY_SIZE),
        workers=1,
        progress=False,
    )
    return cohort, tmp_path / "cache"


def test_a_failed_prepare_leaves_the_previous_index_and_every_volume_it_lists(tmp_path):
    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cache_reader import open_cache, verify_volumes
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig

    cohort, cache = cohort_and_cache(tmp_path)
    cases = find_cases(cohort).cases
    for i, case in enumerate(cases):  # every patient changed: each gets a new volume
        os.utime(case.paths[0], ns=(10**18 + i, 10**18 + i))
    cases[2].paths[1].write_bytes(b"\x1f\x8b broken")  # and one of them now fails
    result = prepare(cases, cache, PreprocessConfig(size=TINY_SIZE), workers=1, progress=False)
    assert len(result.failed) == 1 and len(result.written) == 5 and not result.index_written
    cached = open_cache(cache)  # the previous index: every volume it lists is there, whole
    verify_volumes(cached, range(len(cached)))
    assert len(cached) == 6


def test_a_failing_patient_whose_id_holds_a_colon_is_left_out_of_the_index(tmp_path):
    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cache_reader import open_cache
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig

    cohort, _ = cohort_and_cache(tmp_path, 4)
    cases = find_cases(cohort).cases
    cases[0] = cases[0].__class__("site:A: case 1", cases[0].label, cases[0].paths)
    bad = tmp_path / "bad_t1.nii.gz"
    bad.write_bytes(b"not a scan")
    cases[0] = cases[0].__class__(cases[0].patient_id, cases[0].label, (bad, *cases[0].paths[1:]))
    out = tmp_path / "colon"
    result = prepare(cases, out, PreprocessConfig(size=TINY_SIZE), workers=1, progress=False, skip_bad=True)
    assert [line.startswith("site:A: case 1: cannot read t1") for line in result.failed] == [True]
    cached = open_cache(out)  # opens: no listed patient lacks its volume
    assert "site:A: case 1" not in cached.patient_ids and len(cached) == 3


def test_two_prepares_of_one_cache_at_once_are_refused(tmp_path):
    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig
    from brats.errors import BratsError
    from brats.io.processes import exclusive_lock

    cohort, cache = cohort_and_cache(tmp_path, 4)
    with exclusive_lock(cache, "cache", "wait"):  # as another prepare would hold it
        with pytest.raises(BratsError, match=f"cache {cache} is in use by process {os.getpid()}: wait for"):
            prepare(
                find_cases(cohort).cases, cache, PreprocessConfig(size=TINY_SIZE), workers=1, progress=False
            )
    prepare(find_cases(cohort).cases, cache, PreprocessConfig(size=TINY_SIZE), workers=1, progress=False)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no lock file left behind


def test_prepare_at_another_size_into_an_existing_cache_is_refused_unless_replace(tmp_path):
    import subprocess
    import sys

    cohort, cache = cohort_and_cache(tmp_path, 4)
    before = {p: digest(p) for p in cache.rglob("*") if p.is_file()}
    cmd = [
        sys.executable,
        "-m",
        "brats.prepare",
        str(cohort),
        "--out",
        str(cache),
        "--size",
        "32",
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "size 24 -> 32" in r.stderr and "--replace" in r.stderr, r.stderr
    assert {p: digest(p) for p in cache.rglob("*") if p.is_file()} == before
    r = subprocess.run([*cmd, "--replace"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- 3. every modality on the same grid, really


@pytest.fixture
def one_case(tmp_path):
    from brats.data.cohort import find_cases

    make_cohort(tmp_path / "c", 2, seed=8, shape=TINY_SHAPE, workers=1)
    return find_cases(tmp_path / "c").cases[0]


def edit_header(path: Path, change) -> None:
    """Change fields of a .nii.gz header in place, bytes as they are (nibabel's save would
    rewrite the sform and qform from the image's affine)."""
    import gzip

    import nibabel as nib

    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header(raw[:348], check=False)
    change(header)
    path.write_bytes(gzip.compress(header.binaryblock + raw[348:]))


def preprocess_error(case) -> str:
    from brats.data.preprocess import PreprocessConfig, preprocess_case
    from brats.errors import CaseError

    with pytest.raises(CaseError) as e:
        preprocess_case(case, PreprocessConfig(size=24))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_modality_shifted_40_mm_is_refused(one_case):
    def shift(h):
        h["qoffset_x"] += 40.0
        h["srow_x"][3] += 40.0

    edit_header(one_case.path("flair"), shift)
    err = preprocess_error(one_case)
    assert err.startswith(
        f"{one_case.patient_id}: flair file {one_case.path('flair')} has its origin 40 mm away"
    )


@pytest.mark.parametrize("spacing", [float("nan"), 0.0])
def test_a_spacing_that_is_not_a_positive_number_is_refused(one_case, spacing):
    def bad(h):
        h["pixdim"][3] = spacing

    edit_header(one_case.path("t2"), bad)
    err = preprocess_error(one_case)
    assert (
        f"cannot read t2 file {one_case.path('t2')}: its header's voxel spacing" in err
        and "not positive" in err
    )


def test_nan_in_the_t1_sform_is_blamed_on_the_t1(one_case):
    def nan(h):
        h["srow_y"][1] = float("nan")

    edit_header(one_case.path("t1"), nan)
    err = preprocess_error(one_case)
    assert f"cannot read t1 file {one_case.path('t1')}: its header's sform holds NaN" in err
    assert "t1ce" not in err


def test_a_constant_modality_is_refused(one_case):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(one_case.path("t1ce")))
    flat = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(img).shape, 500, np.int16))
    flat.CopyInformation(img)
    sitk.WriteImage(flat, str(one_case.path("t1ce")))
    err = preprocess_error(one_case)
    assert f"t1ce file {one_case.path('t1ce')}: every voxel holds the same value (500)" in err
