import csv
import shutil

import pytest
from conftest import case_dirs

from brats.cohort import MODALITIES, check_trainable, find_cases, summarize
from brats.errors import BratsError


def test_brats18_layout(cohort18):
    cohort = find_cases(cohort18)
    assert len(cohort.cases) == 14 and not cohort.problems
    assert [c.patient_id for c in cohort.cases] == sorted(c.patient_id for c in cohort.cases)
    for case in cohort.cases:
        assert case.label == (1 if case.paths[0].parent.parent.name == "HGG" else 0)
        for mod, p in zip(MODALITIES, case.paths):
            assert p.name == f"{case.patient_id}_{mod}.nii.gz"
    assert summarize([c.label for c in cohort.cases]) == "14 patients: 10 HGG, 4 LGG (HGG:LGG 2.50:1)"


def make_brats20(src, dst):
    """Flatten a 2018 tree into the 2020 layout with name_mapping.csv."""
    dst.mkdir()
    rows = []
    for d in case_dirs(src):
        shutil.copytree(d, dst / d.name)
        rows.append({"Grade": d.parent.name, "BraTS_2017_subject_ID": "x", "BraTS_2020_subject_ID": d.name})
    with (dst / "name_mapping.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Grade", "BraTS_2017_subject_ID", "BraTS_2020_subject_ID"])
        w.writeheader()
        w.writerows(rows)
    return dst


def test_brats20_layout_grade_from_csv(cohort18, tmp_path):
    root = make_brats20(cohort18, tmp_path / "brats20")
    (root / find_cases(cohort18).cases[0].patient_id / "x_seg.nii.gz").write_bytes(b"ignored")
    a, b = find_cases(cohort18), find_cases(root)
    assert [(c.patient_id, c.label) for c in a.cases] == [(c.patient_id, c.label) for c in b.cases]
    assert not b.problems


def test_brats20_unknown_grade_and_missing_row(cohort18, tmp_path):
    root = make_brats20(cohort18, tmp_path / "brats20")
    text = (root / "name_mapping.csv").read_text().splitlines()
    first_id = text[1].split(",")[2]
    text[1] = text[1].replace("HGG", "GBM").replace("LGG", "GBM")
    text.pop(2)
    (root / "name_mapping.csv").write_text("\n".join(text) + "\n")
    problems = [str(e) for e in find_cases(root).problems]
    assert any(first_id in p and "unknown grade 'GBM'" in p for p in problems)
    assert any("is not in" in p and "name_mapping.csv" in p for p in problems)


def test_manifest(cohort18, tmp_path):
    manifest = tmp_path / "cohort.csv"
    cases = find_cases(cohort18).cases
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", *MODALITIES])
        for c in cases:
            w.writerow(
                [
                    c.patient_id,
                    "HGG" if c.label else "LGG",
                    *[p.relative_to(tmp_path.parent) for p in c.paths],
                ]
            )
    # paths relative to the CSV: put the CSV where those relative paths resolve
    moved = tmp_path.parent / "cohort.csv"
    shutil.move(manifest, moved)
    got = find_cases(moved)
    assert [(c.patient_id, c.label) for c in got.cases] == [(c.patient_id, c.label) for c in cases]


def test_missing_modality_names_patient_and_file(cohort_copy):
    d = case_dirs(cohort_copy)[0]
    (d / f"{d.name}_t1ce.nii.gz").unlink()
    cohort = find_cases(cohort_copy)
    assert len(cohort.cases) == 13
    (msg,) = [str(e) for e in cohort.problems]
    assert msg.startswith(f"{d.name}: missing modality t1ce (looked for {d.name}_t1ce.nii[.gz]")


def test_nii_and_niigz_for_one_modality(cohort_copy):
    d = case_dirs(cohort_copy)[1]
    shutil.copy(d / f"{d.name}_t2.nii.gz", d / f"{d.name}_t2.nii")
    (msg,) = [str(e) for e in find_cases(cohort_copy).problems]
    assert msg.startswith(f"{d.name}: modality t2 has 2 files") and "keep exactly one" in msg


def test_duplicate_patient_id(cohort_copy):
    d = case_dirs(cohort_copy)[0]
    other = "LGG" if d.parent.name == "HGG" else "HGG"
    shutil.copytree(d, cohort_copy / other / d.name)
    with pytest.raises(BratsError, match=f"{d.name}: duplicate patient id"):
        find_cases(cohort_copy)


def test_empty_cohort_and_one_class(tmp_path, cohort_copy):
    (tmp_path / "empty" / "HGG").mkdir(parents=True)
    with pytest.raises(BratsError, match="empty cohort"):
        check_trainable(find_cases(tmp_path / "empty").cases, tmp_path / "empty")
    shutil.rmtree(cohort_copy / "LGG")
    with pytest.raises(BratsError, match="one class only \\(10 HGG\\)"):
        check_trainable(find_cases(cohort_copy).cases, cohort_copy)


def test_no_layout_recognised(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(BratsError, match="no grades found"):
        find_cases(tmp_path)
    with pytest.raises(BratsError, match="does not exist"):
        find_cases(tmp_path / "nope")


def test_unlabelled_folder_for_prediction(cohort18):
    d = case_dirs(cohort18)[0]
    single = find_cases(d, labelled=False)
    assert [(c.patient_id, c.label) for c in single.cases] == [(d.name, None)]
    flat = find_cases(cohort18 / "HGG", labelled=False)
    assert len(flat.cases) == 10 and all(c.label is None for c in flat.cases)
