"""Preprocess each patient once: fingerprinted, atomic, parallel; memory-mapped for training.

Layout of a cache folder:
    index.json                      preprocessing config + one entry per usable patient
    volumes/<patient>.<fp>.npy      float16 (C, S, S, S), one file per patient

The fingerprint of a patient is a hash of the preprocessing contract (which includes the
preprocessing version) and the size and mtime of each source file, and it is part of the file
name: a file exists only once it is complete (temp file + fsync + rename), so a run killed at
any point leaves no partial entry, and the next run redoes only what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brats.atomic import remove_stale_temps, write_atomic, write_json_atomic
from brats.cohort import Case, check_trainable
from brats.errors import BratsError, CaseError
from brats.preprocess import PreprocessConfig, preprocess_case

INDEX = "index.json"
VOLUMES = "volumes"


def fingerprint(case: Case, cfg: PreprocessConfig) -> str:
    """16 hex digits that change when the contract or any source file (size, mtime) changes."""
    files = []
    for p in case.paths:
        st = os.stat(p)
        files.append([Path(p).name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"preprocess": cfg.to_contract(), "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def volume_name(patient_id: str, fp: str) -> str:
    return f"{patient_id}.{fp}.npy"


def _init_worker() -> None:
    # One process per core: each SimpleITK reader runs single-threaded.
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


def _prepare_one(case: Case, cfg: PreprocessConfig, target: Path) -> str | None:
    """Preprocess and write one patient; returns an error line instead of raising."""
    try:
        volume = preprocess_case(case, cfg).astype(np.float16)
    except CaseError as e:
        return str(e)
    except Exception as e:  # an unexpected failure of one patient must not stop the others
        return f"{case.patient_id}: preprocessing failed ({type(e).__name__}: {e})"
    write_atomic(target, lambda f: np.save(f, volume))
    for old in target.parent.glob(f"{case.patient_id}.*.npy"):
        if old.name != target.name:
            old.unlink(missing_ok=True)
    return None


@dataclass
class PrepareResult:
    written: list[str]
    reused: list[str]
    failed: list[str]  # one line per patient: "<patient>: <reason>"
    index_written: bool


def prepare(
    cases: list[Case],
    out: str | Path,
    cfg: PreprocessConfig = PreprocessConfig(),
    workers: int | None = None,
    skip_bad: bool = False,
    known_failures: Iterable[CaseError] = (),
    source: str = "",
    progress: bool = True,
) -> PrepareResult:
    """Bring the cache at `out` up to date with `cases`.

    Every patient is attempted; failures (with `known_failures` from cohort discovery) are
    collected. The index is (re)written only when every patient succeeded or `skip_bad` is set,
    and only when its content changed, so an unchanged cohort writes nothing.
    """
    out = Path(out)
    vol_dir = out / VOLUMES
    vol_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(vol_dir)  # left by a killed run

    entries, jobs, reused = [], [], []
    for case in cases:
        fp = fingerprint(case, cfg)
        target = vol_dir / volume_name(case.patient_id, fp)
        entries.append(
            {
                "patient_id": case.patient_id,
                "label": case.label,
                "file": f"{VOLUMES}/{target.name}",
                "fingerprint": fp,
            }
        )
        if target.exists():
            reused.append(case.patient_id)
        else:
            jobs.append((case, target))

    failed = [str(e) for e in known_failures]
    written = []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = tqdm(total=len(jobs), desc="prepare", unit="patient", disable=not progress or not jobs)

    def record(case: Case, err: str | None) -> None:
        if err:
            failed.append(err)
        else:
            written.append(case.patient_id)
        bar.update()

    if workers == 1:
        for case, target in jobs:
            record(case, _prepare_one(case, cfg, target))
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            futures = {pool.submit(_prepare_one, case, cfg, target): case for case, target in jobs}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
    bar.close()

    failed_ids = {line.split(":", 1)[0] for line in failed}
    index_written = False
    if not failed or skip_bad:
        index = {
            "preprocess": cfg.to_contract(),
            "source": source,
            "patients": [e for e in entries if e["patient_id"] not in failed_ids],
            "skipped": sorted(failed),
        }
        path = out / INDEX
        old = json.loads(path.read_text()) if path.exists() else None
        if old != index:
            write_json_atomic(path, index)
            index_written = True
    return PrepareResult(sorted(written), sorted(reused), sorted(failed), index_written)


@dataclass(frozen=True)
class CachedCohort:
    """A prepared cohort: ids, labels and memory-mapped float16 volumes (C, S, S, S)."""

    root: Path
    patient_ids: list[str]
    labels: np.ndarray  # (N,) int64, 1 = HGG
    volumes: list[np.ndarray]  # memory-mapped, read-only
    preprocess: dict

    def __len__(self) -> int:
        return len(self.patient_ids)

    def indices(self, patients: list[str]) -> list[int]:
        """Positions of `patients` (ids) in this cache."""
        position = {p: i for i, p in enumerate(self.patient_ids)}
        return [position[p] for p in patients]


def open_data(data: str | Path, size: int) -> CachedCohort:
    """The cache a run trains on: `data` itself, or the raw cohort `data` prepared first."""
    return open_cache(ensure_prepared(data, size))


def is_cache(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def open_cache(path: str | Path) -> CachedCohort:
    """Open a prepared cache; checks that every listed volume exists."""
    root = Path(path)
    if not is_cache(root):
        raise BratsError(f"{root} is not a prepared cache (no {INDEX}): run python -m brats.prepare first")
    index = json.loads((root / INDEX).read_text())
    volumes, missing = [], []
    for e in index["patients"]:
        f = root / e["file"]
        if not f.is_file():
            missing.append(e["patient_id"])
            continue
        volumes.append(np.load(f, mmap_mode="r"))
    if missing:
        raise BratsError(
            f"{missing[0]}: cached volume missing in {root} ({len(missing)} in all): "
            "rerun python -m brats.prepare"
        )
    ids = [e["patient_id"] for e in index["patients"]]
    labels = np.array([e["label"] for e in index["patients"]], dtype=np.int64)
    return CachedCohort(root, ids, labels, volumes, index["preprocess"])


def ensure_prepared(data: str | Path, size: int) -> Path:
    """`data` is a prepared cache (returned as is) or a raw cohort, prepared into the folder
    `<data>_cache<size>` beside it (reused when up to date)."""
    from brats.cohort import find_cases, summarize

    data = Path(data)
    if is_cache(data):
        return data
    cohort = find_cases(data)
    check_trainable(cohort.cases, data)
    out = data.parent / f"{data.name}_cache{size}"
    print(f"{data}: {summarize([c.label for c in cohort.cases])}; preparing into {out}")
    result = prepare(
        cohort.cases,
        out,
        PreprocessConfig(size=size),
        known_failures=cohort.problems,
        source=str(data),
    )
    if result.failed:
        lines = "\n  ".join(result.failed)
        raise BratsError(
            f"{len(result.failed)} patient(s) could not be prepared:\n  {lines}\n"
            "fix them, or run python -m brats.prepare --skip-bad"
        )
    return out
