"""Knowing when not to answer: the scan profile, each input check, the model's doubt, and predict
saying it plainly. Each check is shown to catch what it is for and to leave clean scans alone."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from clitools import run_cli
from support import TINY_SHAPE

from brats.data.cohort import MODALITIES, find_cases
from brats.data.phantom import corrupt, corrupt_patients, make_cohort
from brats.data.preprocess import read_image
from brats.data.profile import ScanProfile, cohort_profile, profile_images
from brats.deploy.doubt import assess
from brats.deploy.qc import check_scan, hard_checks, soft_checks


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("qc") / "cohort"
    make_cohort(root, 6, seed=21, shape=TINY_SHAPE, workers=1)
    return find_cases(root).cases


@pytest.fixture(scope="module")
def reference(phantoms) -> dict:
    """A training cohort's profile, as export puts it in the contract."""
    return cohort_profile([profile_images([read_image(c, m) for m in MODALITIES]) for c in phantoms])


def images_of(case) -> list[sitk.Image]:
    return [read_image(case, m) for m in MODALITIES]


def test_a_brats_size_skull_stripped_scan_passes_and_its_skull_on_or_thick_slice_versions_fail(tmp_path):
    """A 240 x 240 x 155, 1 mm, LPS, skull-stripped phantom passes the hard checks; the same
    patient with its skull on, or in 5.5 mm slices, is refused, each for its reason."""
    make_cohort(tmp_path / "real", 2, seed=1, workers=1)  # BraTS 2018's grid
    case = find_cases(tmp_path / "real").cases[0]
    images = images_of(case)
    profile = profile_images(images)
    assert (
        profile.size == (240, 240, 155)
        and profile.spacing_mm == (1.0, 1.0, 1.0)
        and profile.orientation == "LPS"
    )
    assert 0.05 < profile.nonzero_share < 0.40
    assert profile.edge_share == 0  # the brain touches no face of the field of view
    trained = {"features": {"spacing_max_mm": {"max": 1.0}, "edge_share": {"max": 0.0}}}
    assert hard_checks(profile, trained, cube_voxel_mm=1.1) == []
    rng = np.random.default_rng(0)
    [skull] = hard_checks(profile_images(corrupt(images, "skull_on", rng)), trained, 1.1)
    assert skull.startswith("not skull-stripped: ") and "BraTS" in skull
    [thick] = hard_checks(profile_images(corrupt(images, "thick_slices", rng)), trained, 1.1)
    assert thick.startswith("slices of 5.5 mm, much coarser than the 1 mm the model was trained on")


def test_a_brain_cut_by_the_field_of_view_is_refused(phantoms, reference):
    images = images_of(phantoms[0])
    assert check_scan(profile_images(images), reference, 4.0).status == "pass"
    cut = check_scan(profile_images(corrupt(images, "cut_by_fov", np.random.default_rng(0))), reference, 4.0)
    assert cut.status == "fail" and any("cut by the field of view" in r for r in cut.reasons)


def test_soft_checks_name_a_scan_unlike_the_training_cohort(phantoms, reference):
    profile = profile_images(images_of(phantoms[1]))
    assert soft_checks(profile, reference) == []
    big = dataclasses.replace(profile, brain_ml=10 * reference["features"]["brain_ml"]["max"])
    [said] = soft_checks(big, reference)
    assert said.startswith("brain volume") and "unlike the training patients'" in said
    wide = dataclasses.replace(
        profile, extent_mm=(profile.extent_mm[0], 3 * profile.extent_mm[1], profile.extent_mm[2])
    )
    [said] = soft_checks(wide, reference)
    assert said.startswith("brain extent") and "along y" in said
    flair_skew = reference["features"]["skewness_flair"]["q50"]
    swapped = dataclasses.replace(profile, skewness={**profile.skewness, "t1": flair_skew})
    reasons = soft_checks(swapped, reference)
    assert any(r.startswith("t1 intensities unlike the training t1 scans") and "flair" in r for r in reasons)
    assert check_scan(swapped, reference, 4.0).status == "warn"


def test_the_profile_reads_back_from_json_and_the_cohort_summary_has_every_feature(phantoms, reference):
    profile = profile_images(images_of(phantoms[0]))
    assert ScanProfile.from_json(profile.to_json()) == profile
    assert {"brain_ml", "edge_share", "skewness_flair", "spacing_max_mm"} <= set(reference["features"])
    assert reference["patients"] == 6 and reference["orientations"] == ["LPS"]


def test_doubt_flags_a_distance_beyond_the_out_of_fold_patients_and_a_fold_disagreement():
    reference = {
        "quantile": 0.98,
        "distance_threshold": 3.0,
        "oof_distances": [0.5, 1.0, 1.5, 2.0, 3.0],
        "spread_threshold": 0.3,
    }
    fold_p = np.array([[0.5, 0.52, 0.49], [0.1, 0.9, 0.5]])
    near, far = assess(fold_p, np.array([1.2, 7.0]), reference, 2)
    assert (near.ood, near.disagree, near.percentile) == (False, False, 40.0)
    assert far.ood and far.disagree and far.percentile == 100.0
    assert [r.split(":")[0] for r in far.reasons] == [
        "out of distribution",
        "the fold models disagree (p(HGG) spread 0.80)",
    ]
    assert assess(None, None, None, 2)[0].ood is None  # a model exported before: nothing claimed


def test_the_feature_distance_is_about_1_for_training_patients_and_large_far_away():
    import torch

    from brats.models.explained import FeatureReference

    torch.manual_seed(0)
    train = torch.randn(60, 32) * torch.linspace(3, 0.1, 32)
    reference = FeatureReference.fit(train)
    assert 0.5 < float(reference(train).mean()) < 1.5
    assert float(reference(train[:5] + 20).min()) > 10


def test_predict_refuses_a_skull_on_patient_unless_asked_and_says_it_plainly(exported, tmp_path, capsys):
    """--qc fail (the default) refuses a patient that is not in BraTS space; --qc warn grades it
    flagged; --qc off checks nothing. The table and the summary say so."""
    make_cohort(tmp_path / "new", 3, seed=5, shape=TINY_SHAPE, prefix="NEW", workers=1)
    assert corrupt_patients(tmp_path / "new", ["skull_on"], seed=1) == [("NEW_0000_1", "skull_on")]
    cases = find_cases(tmp_path / "new").cases
    bad = cases[0]
    out = tmp_path / "p.csv"
    runs = {}
    for mode in ("fail", "warn", "off"):
        r = run_cli(capsys, "predict.py", exported[1], tmp_path / "new", "--out", out, "--qc", mode)
        assert r.code == 0, r.err
        rows = {row["patient_id"]: row for row in __import__("csv").DictReader(open(out))}
        runs[mode] = (rows, r.out)
    rows, said = runs["fail"]
    assert rows[bad.patient_id]["qc"] == "fail" and rows[bad.patient_id]["p_hgg"] == ""
    assert rows[bad.patient_id]["qc_reasons"].startswith("not skull-stripped")
    assert "brain volume" not in rows[bad.patient_id]["qc_reasons"]  # the whole head is no brain to measure
    assert f"{bad.patient_id}: not skull-stripped" in said and "REFUSED" in said
    assert "2 graded, 0 failed; 1 refused by QC" in said
    assert all(rows[c.patient_id]["qc"] in ("pass", "warn") for c in cases[1:])
    assert all(row["ood"] in ("yes", "no") and row["ood_distance"] for row in rows.values() if row["p_hgg"])
    rows, said = runs["warn"]
    assert rows[bad.patient_id]["qc"] == "fail" and rows[bad.patient_id]["p_hgg"] != ""
    assert rows[bad.patient_id]["flagged"] == "yes" and "3 graded, 0 failed; 0 refused by QC" in said
    rows, _ = runs["off"]
    assert {row["qc"] for row in rows.values()} == {"off"} and rows[bad.patient_id]["p_hgg"] != ""


def test_the_model_card_lists_the_checks_and_their_thresholds(exported):
    import json

    from brats.runs.paths import RunPaths

    card = json.loads(RunPaths.card(exported[1]).read_text())
    checks = card["quality_control"]
    assert set(checks["hard"]) == {"skull_stripped", "slices", "cut_by_field_of_view"}
    assert "out_of_distribution" in checks["doubt"] and "quantile" in checks["doubt"]["out_of_distribution"]
    assert (
        card["contract"]["profile"]["patients"] == 20 and card["contract"]["doubt"]["distance_threshold"] > 0
    )


def test_prepare_adds_profiles_to_a_cache_made_before_them_without_redoing_its_volumes(cache20, tmp_path):
    import json

    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.preprocess import PreprocessConfig

    cache = tmp_path / "cache"
    shutil.copytree(cache20, cache)
    index = json.loads((cache / "index.json").read_text())
    for entry in index["patients"]:
        del entry["profile"]
    (cache / "index.json").write_text(json.dumps(index))
    result = prepare(
        find_cases(cache20.parent / "cohort").cases,
        cache,
        PreprocessConfig(size=TINY_SIZE),
        workers=1,
        progress=False,
    )
    assert result.written == [] and len(result.reused) == 20 and result.index_written
    assert all("profile" in e for e in json.loads((cache / "index.json").read_text())["patients"])
    assert Path(cache / "index.json").read_text() == (cache20 / "index.json").read_text()
