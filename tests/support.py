"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TINY_SHAPE = (40, 40, 28)  # x, y, z voxels: enough for a brain, a tumour and fast tests
TINY_SIZE = 24  # preprocessed cube side

# Small, fast training settings shared by the training tests (depth 10, tiny cubes, no workers).
FAST = dict(depth=10, workers=0, progress=False, min_epochs=1, warmup_epochs=1.0)


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None, origin=None) -> None:
    """Write a (z, y, x) array as NIfTI with LPS identity direction and origin 0 unless given."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def case_dirs(root: Path) -> list[Path]:
    return sorted(p for g in ("HGG", "LGG") for p in (root / g).iterdir())


def make_brats20(src: Path, dst: Path) -> Path:
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


def reset_accelerate() -> None:
    """In-process training creates an Accelerator; its global state must not leak into the next."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_cv(cache: Path, run: Path, policy: str = "final", **overrides) -> Path:
    """Train every fold of a tiny CV run in-process."""
    from brats.training.config import make_config
    from brats.training.engine import train_fold

    settings = {**FAST, **overrides}
    for k in range(settings.get("folds", 5)):
        train_fold(make_config(policy, data=str(cache), run=str(run), fold=k, **settings))
        reset_accelerate()
    return run


def copy_run(src: Path, dst: Path) -> Path:
    """Copy a run folder, hard-linking its checkpoints (~300 MB a fold even at depth 10): a test
    that changes one must write it with `resave`, which breaks the link first."""

    def copy(a: str, b: str) -> None:
        if a.endswith(".pt"):
            os.link(a, b)
        else:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=copy)
    return dst


def resave(obj: dict, path: Path) -> None:
    """torch.save to a fresh file, leaving any hard-linked original untouched."""
    import torch

    path.unlink()
    torch.save(obj, path)


def prepared_cohort(base: Path, patients: int, seed: int, **cohort) -> Path:
    """A synthetic cohort of tiny patients in base/cohort, prepared into base/cache; returns the cache."""
    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.phantom import make_cohort
    from brats.data.preprocess import PreprocessConfig

    make_cohort(base / "cohort", patients, seed=seed, shape=TINY_SHAPE, workers=1, **cohort)
    cases = find_cases(base / "cohort").cases
    prepare(cases, base / "cache", PreprocessConfig(size=TINY_SIZE), workers=2, progress=False)
    return base / "cache"


# --- processes, read from /proc (Linux)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited; only its parent's wait is missing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


def eventually(condition, patience_s: float) -> bool:
    """Poll `condition` until it holds or `patience_s` has passed; returns whether it holds.
    Tests assert the condition (`assert eventually(...)`): the patience only bounds a hang, it
    is no speed goal (those live in bench/)."""
    import time

    give_up = time.monotonic() + patience_s
    while not condition() and time.monotonic() < give_up:
        time.sleep(0.05)
    return bool(condition())
