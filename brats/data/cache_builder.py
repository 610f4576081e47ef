"""Prepare a cache: preprocess each patient once, verified, atomic, in parallel (brats.data.cache_format
describes what it writes).

The next run redoes only what is missing or changed: a volume already there is reused only
when it passes its checks (header, size, the checksum in the index); a broken one is redone.
Workers die with prepare, even when it is killed (brats.io.processes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brats.data.cache_format import (
    DTYPE,
    INDEX,
    VOLUMES,
    Broken,
    all_finite,
    read_index,
    read_volume,
    volume_name,
    volume_owner,
)
from brats.data.cohort import MODALITIES, Case
from brats.data.preprocess import PreprocessConfig, preprocess_images, read_image
from brats.data.profile import profile_images
from brats.errors import BratsError, CaseError
from brats.io.atomic import check_output_dir, remove_stale_temps, write_atomic, write_json_atomic
from brats.io.compression import checksum
from brats.io.nifti import remove_stale_headers
from brats.io.processes import die_with_parent, exclusive_lock

log = logging.getLogger(__name__)


# Cube sides prepare accepts. ResNet3D (depth 10 and 50, strided) trains on any side from 1 voxel
# in batches of 2 or more (measured); at 16 layers 3-4 already see 1^3 maps, and train.py asks
# for at least 16 too. Above 512, one float16 volume is 1 GiB: no GPU trains a batch of those.
SIZE_MIN, SIZE_MAX = 16, 512


def check_size(size: int) -> None:
    if not SIZE_MIN <= size <= SIZE_MAX:
        raise BratsError(
            f"--size {size}: choose a cube side from {SIZE_MIN} to {SIZE_MAX} voxels (RECIPE.md 6.2: 128)"
        )


def check_cache_dir(out: str | Path) -> Path:
    """Check, before any work, that a cache can be written at `out` (created if needed), and that
    an existing folder there is a cache (an index.json without volumes/ is somebody's file)."""
    if (Path(out) / INDEX).is_file() and not (Path(out) / VOLUMES).is_dir():
        raise BratsError(
            f"{out} holds an {INDEX} but no {VOLUMES}/ folder: it is not a cache; choose another --out "
            f"(or remove that {INDEX} if it is what is left of one)"
        )
    out = check_output_dir(out, "cache folder")
    check_output_dir(out / VOLUMES, "cache folder")
    if (out / INDEX).is_dir():
        raise BratsError(f"cache folder {out}: {out / INDEX} is a folder: remove it or choose another --out")
    return out


def fingerprint(case: Case, cfg: PreprocessConfig) -> str:
    """16 hex digits that change when the contract or any source file (size, mtime) changes."""
    files = []
    for p in case.paths:
        st = os.stat(p)
        files.append([Path(p).name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"preprocess": cfg.to_contract(), "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _init_worker(main_pid: int) -> None:
    die_with_parent(main_pid)
    # One process per core: each SimpleITK reader runs single-threaded.
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


def _prepare_one(
    case: Case, cfg: PreprocessConfig, target: Path, volume_too: bool = True
) -> tuple[str | None, int | None, dict | None]:
    """Preprocess and write one patient (or, for a volume that is reused, only profile it);
    returns (error line, None, None) instead of raising, or (None, checksum of the volume's data
    or None, the scans' profile)."""
    try:
        images = [read_image(case, m) for m in MODALITIES]
        volume = preprocess_images(case, images, cfg)[0].astype(DTYPE) if volume_too else None
        profile = profile_images(images).to_json()
    except CaseError as e:
        return str(e), None, None
    except Exception as e:  # an unexpected failure of one patient must not stop the others
        return f"{case.patient_id}: preprocessing failed ({type(e).__name__}: {e})", None, None
    if volume is None:
        return None, None, profile
    if not all_finite(volume):  # never cache what would turn the losses into NaN
        return f"{case.patient_id}: preprocessing gave NaN or infinite values (check its images)", None, None
    # Superseded volumes stay until the index that no longer lists them is written (`_sweep`).
    write_atomic(target, lambda f: np.save(f, volume))
    return None, checksum(memoryview(volume).cast("B")), profile


@dataclass
class PrepareResult:
    written: list[str]
    reused: list[str]
    failed: list[str]  # one line per patient: "<patient>: <reason>"
    index_written: bool
    repaired: list[str] = field(default_factory=list)  # "<patient>: cached volume ... was broken ..."
    index_problem: str = ""  # why the previous index.json could not be used, if it could not


def prepare(
    cases: list[Case],
    out: str | Path,
    cfg: PreprocessConfig = PreprocessConfig(),
    workers: int | None = None,
    skip_bad: bool = False,
    known_failures: Iterable[CaseError] = (),
    source: str = "",
    progress: bool = True,
    replace: bool = False,
) -> PrepareResult:
    """Bring the cache at `out` up to date with `cases`, as one transaction.

    Every patient is attempted; failures (with `known_failures` from cohort discovery) are
    collected by patient. A volume already there is reused only when it passes its checks
    (header, size, the checksum in the index); a broken one is redone and listed in `repaired`.
    The index is (re)written only when every patient succeeded or `skip_bad` is set, and only
    when its content changed; volumes it no longer lists are deleted only after it is written,
    so a failed run leaves the previous index and every volume it lists whole. A cache prepared
    with other settings (another size) is refused unless `replace`; one prepare at a time.
    """
    check_size(cfg.size)
    out = check_cache_dir(out)
    with exclusive_lock(out, f"cache {out}", "wait for the other prepare to finish"):
        remove_stale_temps(out / VOLUMES)  # left by a killed run
        remove_stale_headers()
        remove_stale_temps(out)
        old_index, index_problem = None, ""
        if (out / INDEX).exists():
            try:
                old_index = read_index(out / INDEX)
            except Broken as e:
                index_problem = f"{out / INDEX} {e}"
        if old_index is not None and not replace:
            check_same_settings(out, old_index["preprocess"], cfg)
        old_entries = {(e["patient_id"], e["file"]): e for e in (old_index or {}).get("patients", [])}
        entries, jobs, reused, repaired = _plan(cases, cfg, out / VOLUMES, old_entries)
        failures = {e.patient_id: str(e) for e in known_failures}
        written = _run_jobs(jobs, cfg, workers, progress, entries, failures)
        failures.update(same_volumes(entries, failures))
        index_written = False
        if not failures or skip_bad:
            index = {
                "preprocess": cfg.to_contract(),
                "source": source,
                "patients": [e for pid, e in entries.items() if pid not in failures],
                "skipped": sorted(failures.values()),
            }
            if old_index != index:
                write_json_atomic(out / INDEX, index)
                index_written = True
            _sweep(out / VOLUMES, {Path(e["file"]).name for e in index["patients"]})
    failed = sorted(failures.values())
    return PrepareResult(sorted(written), sorted(reused), failed, index_written, repaired, index_problem)


def same_volumes(entries: dict[str, dict], failures: dict[str, str]) -> dict[str, str]:
    """Patients whose preprocessed volumes are identical (one patient's scans under two ids: a
    copy, a hard link, a release that renamed cases): each refused, naming the others. Kept, the
    same patient could train a fold and score it."""
    by_crc: dict[int, list[str]] = {}
    for pid, entry in entries.items():
        if pid not in failures and entry.get("crc32") is not None:
            by_crc.setdefault(entry["crc32"], []).append(pid)
    refused = {}
    for ids in by_crc.values():
        for pid in ids if len(ids) > 1 else []:
            others = ", ".join(p for p in ids if p != pid)
            refused[pid] = (
                f"{pid}: its scans preprocess to the same volume as {others}'s: give each patient once"
            )
    return refused


def check_same_settings(out: Path, stored: dict, cfg: PreprocessConfig) -> None:
    """A cache holds one preprocessing: another one is refused (a run trained on the cache could no
    longer be evaluated), naming both, unless prepare is told to replace it."""
    wanted = cfg.to_contract()
    diffs = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if diffs:
        shown = ", ".join(f"{k} {stored.get(k)} -> {wanted.get(k)}" for k in diffs)
        raise BratsError(
            f"cache {out} was prepared with other settings ({shown}): give another --out (one cache per "
            "setting), or --replace to prepare it again (runs trained on it can then no longer be evaluated)"
        )


def _sweep(vol_dir: Path, keep: set[str]) -> None:
    """Delete the volume files the written index does not list (superseded or skipped patients)."""
    for f in vol_dir.iterdir():
        if volume_owner(f.name) is not None and f.name not in keep:
            f.unlink(missing_ok=True)


def _plan(
    cases: list[Case], cfg: PreprocessConfig, vol_dir: Path, old: dict
) -> tuple[dict[str, dict], list[tuple[Case, Path, bool]], list[str], list[str]]:
    """Index entries of every case, and the jobs: (case, volume file, whether the volume must be
    (re)made: it is missing or broken). A reused volume whose entry has no profile (a cache made
    before profiles were kept) gets a job that profiles its scans only."""
    shape = (len(cfg.modalities), cfg.size, cfg.size, cfg.size)
    entries: dict[str, dict] = {}
    jobs, reused, repaired = [], [], []
    for case in cases:
        fp = fingerprint(case, cfg)
        target = vol_dir / volume_name(case.patient_id, fp)
        legacy = vol_dir / volume_name(case.patient_id, fp, legacy=True)
        if not target.exists() and legacy.exists():
            target = legacy  # prepared under the earlier naming: reused where it lies
        entry = {
            "patient_id": case.patient_id,
            "label": case.label,
            "file": f"{VOLUMES}/{target.name}",
            "fingerprint": fp,
        }
        if case.collection:
            entry["collection"] = case.collection
        entries[case.patient_id] = entry
        if not target.exists():
            jobs.append((case, target, True))
            continue
        before = old.get((case.patient_id, entry["file"]), {})
        try:
            # without a recorded checksum (the index of a killed run was never written) the
            # file is complete by construction: adopt it once its values are finite
            _, entry["crc32"] = read_volume(target, shape, before.get("crc32"))
            reused.append(case.patient_id)
        except Broken as e:
            repaired.append(f"{case.patient_id}: cached volume {target} {e}; preprocessed again")
            jobs.append((case, target, True))
            continue
        if isinstance(before.get("profile"), dict):
            entry["profile"] = before["profile"]
        else:
            jobs.append((case, target, False))
    return entries, jobs, reused, repaired


def _run_jobs(
    jobs: list[tuple[Case, Path, bool]],
    cfg: PreprocessConfig,
    workers: int | None,
    progress: bool,
    entries: dict[str, dict],
    failures: dict[str, str],
) -> list[str]:
    """Preprocess `jobs` (in worker processes when there are several); records checksums in
    `entries` and each failed patient's error line in `failures`; returns the patients written."""
    written: list[str] = []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = tqdm(total=len(jobs), desc="prepare", unit="patient", disable=not progress or not jobs)

    def record(case: Case, err: str | None, crc: int | None, profile: dict | None) -> None:
        if err:
            failures[case.patient_id] = err
        else:
            if crc is not None:
                written.append(case.patient_id)
                entries[case.patient_id]["crc32"] = crc
            entries[case.patient_id]["profile"] = profile
        bar.update()

    if workers == 1:
        for case, target, volume_too in jobs:
            record(case, *_prepare_one(case, cfg, target, volume_too))
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_prepare_one, job[0], cfg, *job[1:]): job[0] for job in jobs}
            try:
                for fut in as_completed(futures):
                    record(futures[fut], *fut.result())
            except BaseException:
                # a write error (full disk) or Ctrl-C: the patients under way finish or fail
                # atomically, the queued ones never start
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    return written
