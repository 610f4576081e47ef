"""Find patients, their four MRI files and their grade, in every layout a BraTS user has on disk.

Layouts (channel order is always MODALITIES; label HGG=1, LGG=0):
- BraTS 2018/2019: ROOT/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair}.nii[.gz]; grade from the folder.
- BraTS 2020: ROOT/<case>/<case>_{...}.nii[.gz] and ROOT/name_mapping.csv (Grade,
  BraTS_2020_subject_ID); grade only from the CSV.
- A CSV manifest: patient_id,label,t1,t1ce,t2,flair with paths relative to the CSV.
- For prediction only: a folder of patient folders, or one patient folder, without grades.

No torch here: prediction runs without it.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from brats.errors import BratsError, CaseError

MODALITIES = ("t1", "t1ce", "t2", "flair")
CLASSES = ("LGG", "HGG")  # index = label: LGG=0, HGG=1 (HGG is the positive class)
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One patient: id, grade (1 HGG, 0 LGG, None when unknown) and one file per modality."""

    patient_id: str
    label: int | None
    paths: tuple[Path, ...]  # in MODALITIES order

    def path(self, modality: str) -> Path:
        return self.paths[MODALITIES.index(modality)]


@dataclass(frozen=True)
class Cohort:
    """The patients found, and the ones that could not be used with the reason for each."""

    cases: list[Case]
    problems: list[CaseError]


def parse_grade(value: str, where: str) -> int:
    """'HGG'/'LGG' (any case) or '1'/'0' -> 1/0."""
    v = value.strip().upper()
    if v in ("HGG", "1"):
        return 1
    if v in ("LGG", "0"):
        return 0
    raise BratsError(f"{where}: unknown grade {value!r} (use HGG or LGG, or 1 or 0)")


def find_modality_files(folder: Path, patient_id: str) -> tuple[Path, ...]:
    """The four modality files of one case folder, in MODALITIES order.

    Prefers `<patient_id>_<mod>.nii[.gz]`; otherwise any single `*_<mod>.nii[.gz]` in the folder
    (some releases rename cases). Segmentations (`_seg`) are never matched.
    """
    if not folder.is_dir():
        raise CaseError(patient_id, f"{folder} is not a folder")
    files = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    found = []
    for mod in MODALITIES:
        exact = [files[n] for n in (f"{patient_id.lower()}_{mod}{s}" for s in NIFTI_SUFFIXES) if n in files]
        if not exact:
            exact = [p for n, p in files.items() if n.endswith(tuple(f"_{mod}{s}" for s in NIFTI_SUFFIXES))]
        if not exact:
            raise CaseError(
                patient_id,
                f"missing modality {mod} (looked for {patient_id}_{mod}.nii[.gz] in {folder})",
            )
        if len(exact) > 1:
            names = ", ".join(sorted(p.name for p in exact))
            raise CaseError(
                patient_id,
                f"modality {mod} has {len(exact)} files ({names}) in {folder}: keep exactly one",
            )
        found.append(exact[0])
    return tuple(found)


def _case_from_folder(folder: Path, label: int | None, problems: list[CaseError]) -> Case | None:
    try:
        return Case(folder.name, label, find_modality_files(folder, folder.name))
    except CaseError as e:
        problems.append(e)
        return None


def _is_case_folder(folder: Path) -> bool:
    return any(p.name.lower().endswith(NIFTI_SUFFIXES) for p in folder.iterdir() if p.is_file())


def _from_grade_folders(root: Path) -> Cohort:
    cases, problems = [], []
    for grade_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if grade_dir.name.upper() not in CLASSES:
            continue  # e.g. a stray folder; only HGG/LGG carry a grade
        label = parse_grade(grade_dir.name, str(grade_dir))
        for folder in sorted(p for p in grade_dir.iterdir() if p.is_dir()):
            case = _case_from_folder(folder, label, problems)
            if case:
                cases.append(case)
    return Cohort(cases, problems)


def _from_name_mapping(root: Path, mapping: Path) -> Cohort:
    grades: dict[str, str] = {}
    with mapping.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"Grade", "BraTS_2020_subject_ID"}
        if not need <= set(reader.fieldnames or []):
            raise BratsError(f"{mapping}: needs columns {sorted(need)}, has {reader.fieldnames}")
        for row in reader:
            grades[row["BraTS_2020_subject_ID"].strip()] = row["Grade"]
    cases, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        pid = folder.name
        if pid not in grades:
            problems.append(
                CaseError(pid, f"no grade: {pid} is not in {mapping}; add a row or remove the folder")
            )
            continue
        try:
            label = parse_grade(grades[pid], f"{mapping}, row {pid}")
        except BratsError as e:
            problems.append(CaseError(pid, str(e)))
            continue
        case = _case_from_folder(folder, label, problems)
        if case:
            cases.append(case)
    return Cohort(cases, problems)


def _from_manifest(csv_path: Path) -> Cohort:
    cases, problems = [], []
    base = csv_path.parent
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"patient_id", "label", *MODALITIES}
        if not need <= set(reader.fieldnames or []):
            raise BratsError(
                f"{csv_path}: needs columns patient_id,label,{','.join(MODALITIES)}; has {reader.fieldnames}"
            )
        for row in reader:
            pid = row["patient_id"].strip()
            try:
                label = parse_grade(row["label"], f"{csv_path}, row {pid}")
                paths = []
                for mod in MODALITIES:
                    p = Path(row[mod].strip())
                    p = p if p.is_absolute() else base / p
                    if not p.is_file():
                        raise CaseError(
                            pid, f"missing modality {mod}: {p} does not exist (fix the path in {csv_path})"
                        )
                    paths.append(p)
                cases.append(Case(pid, label, tuple(paths)))
            except CaseError as e:
                problems.append(e)
            except BratsError as e:
                problems.append(CaseError(pid, str(e)))
    return Cohort(cases, problems)


def _unlabelled(root: Path) -> Cohort:
    if _is_case_folder(root):
        problems: list[CaseError] = []
        case = _case_from_folder(root, None, problems)
        return Cohort([case] if case else [], problems)
    cases, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        case = _case_from_folder(folder, None, problems)
        if case:
            cases.append(case)
    return Cohort(cases, problems)


def find_cases(root: str | Path, labelled: bool = True) -> Cohort:
    """Every patient under `root` (any supported layout), sorted by id.

    With `labelled=False` (prediction), a folder of patient folders or a single patient folder
    without grades is accepted too; grades found in a labelled layout are still returned.
    Per-patient problems are collected, not raised; problems with the whole cohort raise.
    """
    root = Path(root)
    if not root.exists():
        raise BratsError(f"{root} does not exist: give a BraTS folder or a CSV manifest")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise BratsError(f"{root} is a file but not a CSV manifest (patient_id,label,t1,t1ce,t2,flair)")
        cohort = _from_manifest(root)
    elif any((root / g).is_dir() for g in CLASSES):
        cohort = _from_grade_folders(root)
    elif (root / "name_mapping.csv").is_file():
        cohort = _from_name_mapping(root, root / "name_mapping.csv")
    elif labelled:
        raise BratsError(
            f"{root}: no grades found: expected HGG/ and LGG/ folders (BraTS 2018/2019), "
            "name_mapping.csv (BraTS 2020) or a CSV manifest"
        )
    else:
        cohort = _unlabelled(root)

    counts = Counter(c.patient_id for c in cohort.cases)
    dupes = sorted(pid for pid, n in counts.items() if n > 1)
    if dupes:
        where = {pid: [str(c.paths[0].parent) for c in cohort.cases if c.patient_id == pid] for pid in dupes}
        first = dupes[0]
        raise BratsError(
            f"{first}: duplicate patient id ({' and '.join(where[first])}); "
            f"{len(dupes)} duplicated in all: rename or remove one copy of each"
        )
    cases = sorted(cohort.cases, key=lambda c: c.patient_id)
    return Cohort(cases, sorted(cohort.problems, key=lambda e: e.patient_id))


def check_trainable(cases: list[Case], source: str | Path) -> None:
    """Training needs patients of both grades."""
    if not cases:
        raise BratsError(f"{source}: empty cohort: no usable patient found")
    counts = Counter(c.label for c in cases)
    if None in counts:
        raise BratsError(f"{source}: some patients have no grade; training needs a graded cohort")
    if len(counts) < 2:
        only = CLASSES[next(iter(counts))]
        raise BratsError(
            f"{source}: one class only ({len(cases)} {only}): training needs HGG and LGG patients"
        )


def summarize(labels: list[int | None]) -> str:
    """'285 patients: 210 HGG, 75 LGG (HGG:LGG 2.80:1)'."""
    counts = Counter(labels)
    n_hgg, n_lgg = counts.get(1, 0), counts.get(0, 0)
    text = f"{len(labels)} patients: {n_hgg} HGG, {n_lgg} LGG"
    if n_lgg:
        text += f" (HGG:LGG {n_hgg / n_lgg:.2f}:1)"
    if counts.get(None):
        text += f", {counts[None]} without grade"
    return text
