"""Find patients, their four MRI files and their grade, in every layout a BraTS user has on disk.

Layouts (channel order is always MODALITIES; label HGG=1, LGG=0):
- BraTS 2018/2019: ROOT/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair}.nii[.gz]; grade from the folder.
- BraTS 2020: ROOT/<case>/<case>_{...}.nii[.gz] and ROOT/name_mapping.csv (Grade,
  BraTS_2020_subject_ID); grade only from the CSV.
- A CSV manifest: patient_id,label,t1,t1ce,t2,flair with paths relative to the CSV (and an
  optional `collection` column: the site or data collection each patient comes from).
- For prediction only: a folder of patient folders, or one patient folder, without grades.

In a patient folder each modality file is found by the last word of its name (see MODALITY_NAMES):
`<case>_t1ce.nii.gz` (BraTS 2018-2021), `<case>-t1c.nii.gz` (BraTS 2023 on) or a bare `t1gd.nii`.

No torch here: prediction runs without it.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from brats.errors import BratsError, CaseError

MODALITIES = ("t1", "t1ce", "t2", "flair")
CLASSES = ("LGG", "HGG")  # index = label: LGG=0, HGG=1 (HGG is the positive class)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# The names each modality goes by, compared with the last word of a file name (after the last '_' or
# '-', or the whole name): BraTS 2018-2021 `_t1ce`, BraTS 2023 on `-t1n -t1c -t2w -t2f`, bare files.
# Whole-word comparison keeps t1 apart from t1ce/t1c/t1n and t2 apart from t2f (a FLAIR) and t2w.
MODALITY_NAMES = {
    "t1": ("t1", "t1n"),
    "t1ce": ("t1ce", "t1c", "t1gd"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "fla", "t2f"),
}
_WORD = re.compile(r"(?:^|[_-])([^_-]+)$")  # last word of a file name without its suffix
# BraTS 2018/2019 ids name the collection each scan came from: Brats18_2013_10_1 (the 2013
# challenge), Brats18_CBICA_AAB_1, Brats18_TCIA01_131_1, BraTS19_TMC_06290_1. BraTS 2020 ids
# (BraTS20_Training_001) do not; its name_mapping.csv gives the 2019 or 2018 id beside them.
_COLLECTION = re.compile(r"^brats(?:20)?1[789]_([a-z]+\d*|\d{4})_", re.IGNORECASE)

UNKNOWN = "unknown"  # the collection of a patient whose layout and id do not name one


def collection_of(patient_id: str) -> str | None:
    """The data collection a BraTS 2017-2019 id names (2013, CBICA, TCIA01, ...), else None."""
    m = _COLLECTION.match(patient_id.strip())
    return m.group(1).upper() if m else None


@dataclass(frozen=True)
class Case:
    """One patient: id, grade (1 HGG, 0 LGG, None when unknown) and one file per modality."""

    patient_id: str
    label: int | None
    paths: tuple[Path, ...]  # in MODALITIES order
    collection: str | None = None  # the site or data collection (collection_of), None when unknown

    def path(self, modality: str) -> Path:
        return self.paths[MODALITIES.index(modality)]


@dataclass(frozen=True)
class Cohort:
    """The patients found, and the ones that could not be used with the reason for each."""

    cases: list[Case]
    problems: list[CaseError]
    where: dict[str, str] = field(default_factory=dict)  # patient -> where it was given (a CSV line)


def parse_grade(value: str, where: str) -> int:
    """'HGG'/'LGG' (any case) or '1'/'0' -> 1/0."""
    v = value.strip().upper()
    if v in ("HGG", "1"):
        return 1
    if v in ("LGG", "0"):
        return 0
    raise BratsError(f"{where}: unknown grade {value!r} (use HGG or LGG, or 1 or 0)")


def modality_of(name: str) -> str | None:
    """The modality a NIfTI file name stands for ('BraTS-GLI-00000-000-t2f.nii.gz' -> 'flair')."""
    lower = name.lower()
    if lower.startswith(".") or not lower.endswith(NIFTI_SUFFIXES):
        return None  # hidden files (e.g. macOS `._` copies) are never images
    stem = lower.removesuffix(".gz").removesuffix(".nii")
    word = _WORD.search(stem)
    if word is None:
        return None
    return next((mod for mod, names in MODALITY_NAMES.items() if word.group(1) in names), None)


def find_modality_files(folder: Path, patient_id: str) -> tuple[Path, ...]:
    """The four modality files of one case folder, in MODALITIES order.

    A file belongs to a modality when the last word of its name is one of MODALITY_NAMES; the
    patient id in front of it is not required (some releases rename cases, some ship bare names).
    Two candidates for one modality are an error, never a silent choice; segmentations (`_seg`)
    and other files are ignored.
    """
    if not folder.is_dir():
        raise CaseError(patient_id, f"{folder} is not a folder")
    candidates: dict[str, list[Path]] = {mod: [] for mod in MODALITIES}
    for p in listing(folder, patient_id):
        mod = modality_of(p.name)
        if mod is not None and p.is_file():
            candidates[mod].append(p)
    found = []
    for mod in MODALITIES:
        files = sorted(candidates[mod], key=lambda p: p.name)
        if not files:
            words = ", ".join(MODALITY_NAMES[mod])
            raise CaseError(
                patient_id,
                f"missing modality {mod} (looked for {patient_id}_{mod}.nii[.gz] in {folder}, "
                f"or any .nii[.gz] whose name ends in {words})",
            )
        if len(files) > 1:
            names = ", ".join(p.name for p in files)
            raise CaseError(
                patient_id,
                f"modality {mod} has {len(files)} files ({names}) in {folder}: keep exactly one",
            )
        found.append(files[0])
    return tuple(found)


def _case_from_folder(
    folder: Path, label: int | None, problems: list[CaseError], collection: str | None = None
) -> Case | None:
    try:
        paths = find_modality_files(folder, folder.name)
        return Case(folder.name, label, paths, collection or collection_of(folder.name))
    except CaseError as e:
        problems.append(e)
        return None


def listing(folder: Path, patient_id: str | None = None) -> list[Path]:
    """The entries of `folder`; one that cannot be listed is one line (a CaseError naming the
    patient when it is a patient's folder), never a traceback."""
    try:
        return list(folder.iterdir())
    except OSError as e:
        message = f"cannot list {folder} ({e.strerror or type(e).__name__}): check its permissions"
        raise CaseError(patient_id, message) if patient_id else BratsError(message) from e


def _is_case_folder(folder: Path) -> bool:
    return any(modality_of(p.name) for p in listing(folder) if p.is_file())


def _read_csv(path: Path) -> csv.DictReader:
    """A CSV as dict rows; a byte-order mark (Excel's 'CSV UTF-8') is accepted, other encodings are
    refused: guessing one would turn non-ASCII ids and paths into names that silently do not match."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BratsError(
            f"cannot read {path} ({e.strerror or type(e).__name__}): check its permissions"
        ) from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BratsError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): "
            "save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet program)"
        ) from None
    return csv.DictReader(io.StringIO(text, newline=""))


def _row_length_problem(reader: csv.DictReader, row: dict, path: Path) -> str | None:
    """'<path>, line 7: 4 of 6 fields ...' for a row shorter or longer than the header, else None."""
    n_header = len(reader.fieldnames or [])
    n_row = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
    if n_row == n_header:
        return None
    return (
        f"{path}, line {reader.line_num}: {n_row} of {n_header} fields "
        f"({','.join(reader.fieldnames or [])}): fix that row (a missing or extra comma?)"
    )


def _from_grade_folders(root: Path) -> Cohort:
    cases, problems = [], []
    for grade_dir in sorted(p for p in listing(root) if p.is_dir()):
        if grade_dir.name.upper() not in CLASSES:
            continue  # e.g. a stray folder; only HGG/LGG carry a grade
        label = parse_grade(grade_dir.name, str(grade_dir))
        for folder in sorted(p for p in listing(grade_dir) if p.is_dir()):
            case = _case_from_folder(folder, label, problems)
            if case:
                cases.append(case)
    return Cohort(cases, problems)


def _from_name_mapping(root: Path, mapping: Path) -> Cohort:
    reader = _read_csv(mapping)
    need = {"Grade", "BraTS_2020_subject_ID"}
    if not need <= set(reader.fieldnames or []):
        raise BratsError(f"{mapping}: needs columns {sorted(need)}, has {reader.fieldnames}")
    grades: dict[str, list[tuple[int, str]]] = {}  # patient -> (line, grade) of every row naming it
    collections: dict[str, str] = {}  # from the 2019/2018/2017 ids the file gives beside the 2020 one
    problems: list[CaseError] = []
    for row in reader:
        pid = (row["BraTS_2020_subject_ID"] or "").strip()
        bad = _row_length_problem(reader, row, mapping)
        if bad:
            problems.append(CaseError(pid or f"line {reader.line_num}", bad))
            continue
        grades.setdefault(pid, []).append((reader.line_num, row["Grade"]))
        older = (row.get(f"BraTS_{year}_subject_ID") or "" for year in (2019, 2018, 2017))
        found = next((c for c in map(collection_of, older) if c), None)
        if found:
            collections[pid] = found
    cases = []
    for folder in sorted(p for p in listing(root) if p.is_dir()):
        pid = folder.name
        if pid not in grades:
            problems.append(
                CaseError(pid, f"no grade: {pid} is not in {mapping}; add a row or remove the folder")
            )
            continue
        try:
            labels = {line: parse_grade(grade, f"{mapping}, line {line}") for line, grade in grades[pid]}
        except BratsError as e:
            problems.append(CaseError(pid, str(e)))
            continue
        if len(set(labels.values())) > 1:
            # The last row winning would flip this patient's label without a word.
            rows = ", ".join(f"{CLASSES[label]} on line {line}" for line, label in labels.items())
            problems.append(CaseError(pid, f"{mapping} gives two grades ({rows}): keep one row"))
            continue
        case = _case_from_folder(folder, next(iter(labels.values())), problems, collections.get(pid))
        if case:
            cases.append(case)
    return Cohort(cases, problems)


def _from_manifest(csv_path: Path) -> Cohort:
    cases, problems = [], []
    base = csv_path.parent
    reader = _read_csv(csv_path)
    need = {"patient_id", "label", *MODALITIES}
    if not need <= set(reader.fieldnames or []):
        raise BratsError(
            f"{csv_path}: needs columns patient_id,label,{','.join(MODALITIES)}; has {reader.fieldnames}"
        )
    lines: dict[str, str] = {}
    for row in reader:
        pid = (row["patient_id"] or "").strip() or f"line {reader.line_num}"
        try:
            bad = _row_length_problem(reader, row, csv_path)
            if bad:
                raise CaseError(pid, bad)
            if not (row["patient_id"] or "").strip():
                raise CaseError(
                    pid, f"{csv_path}, line {reader.line_num}: empty patient_id: give every row an id"
                )
            label = parse_grade(row["label"], f"{csv_path}, line {reader.line_num} ({pid})")
            paths = []
            for mod in MODALITIES:
                p = Path(row[mod].strip())
                p = p if p.is_absolute() else base / p
                if not p.is_file():
                    raise CaseError(
                        pid, f"missing modality {mod}: {p} does not exist (fix the path in {csv_path})"
                    )
                paths.append(p)
            given = (row.get("collection") or "").strip()
            cases.append(Case(pid, label, tuple(paths), given or collection_of(pid)))
            lines[pid] = f"line {reader.line_num} of {csv_path}"
        except CaseError as e:
            problems.append(e)
        except BratsError as e:
            problems.append(CaseError(pid, str(e)))
    return Cohort(cases, problems, lines)


def _unlabelled(root: Path) -> Cohort:
    if _is_case_folder(root):
        problems: list[CaseError] = []
        case = _case_from_folder(root, None, problems)
        return Cohort([case] if case else [], problems)
    cases, problems = [], []
    for folder in sorted(p for p in listing(root) if p.is_dir()):
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
    cases, shared = split_shared_files(cohort.cases, cohort.where)
    cases = sorted(cases, key=lambda c: c.patient_id)
    return Cohort(cases, sorted(cohort.problems + shared, key=lambda e: e.patient_id))


def split_shared_files(cases: list[Case], where: dict[str, str]) -> tuple[list[Case], list[CaseError]]:
    """Patients that share a file (one scan given under two ids, by a manifest or through links)
    are refused, each naming the other: their grades, and the folds they land in, would
    otherwise count one patient twice (even with two grades)."""
    owners: dict[Path, list[tuple[Case, str]]] = {}
    for case in cases:
        for mod, path in zip(MODALITIES, case.paths):
            owners.setdefault(path.resolve(), []).append((case, mod))
    clash: dict[str, str] = {}
    for path, users in owners.items():
        ids = list(dict.fromkeys(c.patient_id for c, _ in users))
        if len(ids) > 1:
            named = ", ".join(f"{pid} ({where[pid]})" if pid in where else pid for pid in ids)
            for pid in ids:
                reason = f"shares the file {path} with another id ({named}): give each patient its own files"
                clash.setdefault(pid, reason)
    kept = [c for c in cases if c.patient_id not in clash]
    return kept, [CaseError(pid, reason) for pid, reason in clash.items()]


def check_trainable(cases: list[Case], source: str | Path, problems: list[CaseError] = ()) -> None:
    """Training needs patients of both grades. When it has not got them, the patients that could
    not be used are part of the reason (a grade "GBM" makes every LGG-less cohort), so the line
    counts them and names the first."""
    unused = ""
    if problems:
        unused = f"; {len(problems)} patient(s) could not be used, e.g. {problems[0]}: fix them first"
    if not cases:
        raise BratsError(f"{source}: empty cohort: no usable patient found{unused}")
    counts = Counter(c.label for c in cases)
    if None in counts:
        raise BratsError(f"{source}: some patients have no grade; training needs a graded cohort")
    if len(counts) < 2:
        only = CLASSES[next(iter(counts))]
        raise BratsError(
            f"{source}: one class only ({len(cases)} {only}): training needs HGG and LGG patients{unused}"
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
