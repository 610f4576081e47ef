import csv
import shutil

import pytest
from support import case_dirs, make_brats20

from brats.data.cohort import MODALITIES, check_trainable, find_cases, summarize
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


def test_brats20_duplicate_rows(cohort18, tmp_path):
    """A repeated name_mapping.csv row is fine when it agrees, an error naming the patient when not."""
    root = make_brats20(cohort18, tmp_path / "brats20")
    mapping = root / "name_mapping.csv"
    lines = mapping.read_text().splitlines()
    same, flipped = lines[1], lines[2]
    pid = flipped.split(",")[2]
    other = "LGG" if flipped.startswith("HGG") else "HGG"
    mapping.write_text("\n".join([*lines, same, other + flipped[3:]]) + "\n")
    cohort = find_cases(root)
    (msg,) = [str(e) for e in cohort.problems]
    assert msg.startswith(f"{pid}: ") and "two grades" in msg and "keep one row" in msg
    assert pid not in [c.patient_id for c in cohort.cases]
    assert len(cohort.cases) == 13


def write_manifest(path, cases, root, encoding="utf-8", short_row: int | None = None):
    rows = [["patient_id", "label", *MODALITIES]]
    for c in cases:
        rows.append([c.patient_id, "HGG" if c.label else "LGG", *[p.relative_to(root) for p in c.paths]])
    if short_row is not None:
        rows[short_row] = rows[short_row][:4]
    with path.open("w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_with_byte_order_mark(cohort18, cohort_copy, tmp_path):
    cases = find_cases(cohort_copy).cases
    got = find_cases(write_manifest(cohort_copy / "bom.csv", cases, cohort_copy, encoding="utf-8-sig"))
    assert [(c.patient_id, c.label) for c in got.cases] == [(c.patient_id, c.label) for c in cases]
    root = make_brats20(cohort18, tmp_path / "brats20")
    text = (root / "name_mapping.csv").read_text()
    (root / "name_mapping.csv").write_text(text, encoding="utf-8-sig")
    assert len(find_cases(root).cases) == 14 and not find_cases(root).problems


def test_csv_not_utf8_is_one_line(cohort18, tmp_path):
    root = make_brats20(cohort18, tmp_path / "brats20")
    mapping = root / "name_mapping.csv"
    lines = mapping.read_text().splitlines()
    lines[3] = lines[3].replace(",x,", ",Jos\u00e9,")
    mapping.write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(BratsError, match="name_mapping.csv: not UTF-8 text .*line 4.*save it as UTF-8") as e:
        find_cases(root)
    assert "\n" not in str(e.value)


def test_manifest_short_row_names_the_row(cohort_copy):
    cases = find_cases(cohort_copy).cases
    manifest = write_manifest(cohort_copy / "m.csv", cases, cohort_copy, short_row=3)
    cohort = find_cases(manifest)
    assert len(cohort.cases) == 13
    (msg,) = [str(e) for e in cohort.problems]
    assert msg.startswith(f"{cases[2].patient_id}: ") and "line 4" in msg and "4 of 6 fields" in msg


def rename_case(src, dst, names: dict[str, str]):
    """Copy one patient folder under new file names (modality -> new name)."""
    dst.mkdir(parents=True)
    for mod in MODALITIES:
        shutil.copy(src / f"{src.name}_{mod}.nii.gz", dst / names[mod])
    return dst


RELEASES = {
    "BraTS2021_00000": [
        "BraTS2021_00000_t1.nii.gz",
        "BraTS2021_00000_t1ce.nii.gz",
        "BraTS2021_00000_t2.nii.gz",
        "BraTS2021_00000_flair.nii.gz",
    ],
    "BraTS-GLI-00000-000": [
        "BraTS-GLI-00000-000-t1n.nii.gz",
        "BraTS-GLI-00000-000-t1c.nii.gz",
        "BraTS-GLI-00000-000-t2w.nii.gz",
        "BraTS-GLI-00000-000-t2f.nii.gz",
    ],
    "bare": ["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"],
    "bare_gd": ["T1.nii", "t1gd.nii.gz", "t2w.nii.gz", "fla.nii.gz"],
    "bare_c": ["t1.nii.gz", "t1c.nii", "T2.NII.GZ", "t2f.nii.gz"],
}


@pytest.mark.parametrize("pid", list(RELEASES))
def test_file_names_of_every_release(cohort18, tmp_path, pid):
    """BraTS 2021 (_t1ce), BraTS 2023+ (-t1n/-t1c/-t2w/-t2f) and bare names, .nii and .nii.gz."""
    names = dict(zip(MODALITIES, RELEASES[pid]))
    src = case_dirs(cohort18)[0]
    folder = rename_case(src, tmp_path / "new" / pid, names)
    (folder / f"{pid}-seg.nii.gz").write_bytes(b"ignored")
    (folder / f"{pid}_seg.nii.gz").write_bytes(b"ignored")
    for root in (folder, folder.parent):  # one patient folder, or a folder of patient folders
        cohort = find_cases(root, labelled=False)
        assert not cohort.problems, cohort.problems
        ((case),) = cohort.cases
        assert case.patient_id == pid
        assert [p.name for p in case.paths] == RELEASES[pid]


def test_similar_names_are_not_confused(cohort18, tmp_path):
    """t1 is not t1ce/t1c/t1gd, t2 is not t2f (FLAIR); t1n is T1 and t2w is T2."""
    src = case_dirs(cohort18)[0]
    names = {"t1": "x-t1n.nii.gz", "t1ce": "x-t1c.nii.gz", "t2": "x-t2w.nii.gz", "flair": "x-t2f.nii.gz"}
    folder = rename_case(src, tmp_path / "P1", names)
    case = find_cases(folder, labelled=False).cases[0]
    assert [p.name for p in case.paths] == list(names.values())
    # the order files are listed in must not matter: each name has exactly one meaning
    names = {"t1": "P_t1.nii.gz", "t1ce": "P_t1ce.nii.gz", "t2": "P_t2.nii.gz", "flair": "P_t2f.nii.gz"}
    folder = rename_case(src, tmp_path / "P2", names)
    case = find_cases(folder, labelled=False).cases[0]
    assert [p.name for p in case.paths] == list(names.values())
    (folder / "._P_t1.nii.gz").write_bytes(b"macOS metadata")  # hidden files are not images
    assert not find_cases(folder, labelled=False).problems


@pytest.mark.parametrize(
    ("extra", "mod"),
    [("P_t1n.nii.gz", "t1"), ("t1gd.nii.gz", "t1ce"), ("P-t2w.nii", "t2"), ("fla.nii.gz", "flair")],
)
def test_two_candidates_for_one_modality(cohort18, tmp_path, extra, mod):
    src = case_dirs(cohort18)[0]
    names = {m: f"P_{m}.nii.gz" for m in MODALITIES}
    folder = rename_case(src, tmp_path / "P", names)
    shutil.copy(folder / names[mod], folder / extra)
    (msg,) = [str(e) for e in find_cases(folder, labelled=False).problems]
    assert msg.startswith(f"P: modality {mod} has 2 files ({', '.join(sorted([names[mod], extra]))})")


def test_missing_modality_lists_the_names_tried(cohort18, tmp_path):
    src = case_dirs(cohort18)[0]
    folder = rename_case(src, tmp_path / "P", {m: f"P_{m}.nii.gz" for m in MODALITIES})
    (folder / "P_t1ce.nii.gz").rename(folder / "P_t1_contrast.nii.gz")
    (msg,) = [str(e) for e in find_cases(folder, labelled=False).problems]
    assert msg.startswith("P: missing modality t1ce (looked for P_t1ce.nii[.gz]") and "t1gd" in msg


def test_the_collection_comes_from_the_id_the_2020_mapping_or_a_manifest_column(cohort18, tmp_path):
    from brats.data.cohort import collection_of

    ids = ["Brats18_2013_10_1", "Brats18_CBICA_AAB_1", "Brats18_TCIA01_131_1", "BraTS19_TMC_06290_1"]
    assert [collection_of(p) for p in ids] == ["2013", "CBICA", "TCIA01", "TMC"]
    assert collection_of("BraTS20_Training_001") is None and collection_of("BraTS-GLI-00000-000") is None
    assert {c.collection for c in find_cases(cohort18).cases} == {"SYN"}  # Brats18_SYN_0000_1
    # BraTS 2020: the id names no collection; name_mapping.csv gives the 2019 id beside it
    root = tmp_path / "brats20"
    root.mkdir()
    rows = []
    for i, d in enumerate(case_dirs(cohort18)):
        new = f"BraTS20_Training_{i:03d}"
        shutil.copytree(d, root / new)
        for f in (root / new).iterdir():
            f.rename(f.with_name(f.name.replace(d.name, new)))
        older = ["Brats18_CBICA_A{i}_1", "NA"][i % 2].format(i=i)
        rows.append([d.parent.name, older, new])
    with (root / "name_mapping.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["Grade", "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"], *rows])
    got = {c.patient_id: c.collection for c in find_cases(root).cases}
    assert got["BraTS20_Training_000"] == "CBICA" and got["BraTS20_Training_001"] is None
    # a manifest's collection column wins over the id
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", *MODALITIES, "collection"])
        for c in find_cases(cohort18).cases:
            w.writerow([c.patient_id, c.label, *c.paths, "HOSPITAL_A" if c.label else ""])
    got = {c.label: c.collection for c in find_cases(manifest).cases}
    assert got == {1: "HOSPITAL_A", 0: "SYN"}
