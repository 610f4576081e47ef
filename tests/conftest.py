"""Shared fixtures: tiny synthetic cohorts (made once per session) and small helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from brats.synthetic import make_cohort

TINY_SHAPE = (40, 40, 28)  # x, y, z voxels: enough for a brain, a tumour and fast tests
TINY_SIZE = 24  # preprocessed cube side


@pytest.fixture(scope="session")
def cohort18(tmp_path_factory) -> Path:
    """A BraTS 2018 tree of 14 tiny synthetic patients (read-only: copy before changing it)."""
    root = tmp_path_factory.mktemp("brats18") / "MICCAI_BraTS_2018_Data_Training"
    make_cohort(root, 14, seed=3, shape=TINY_SHAPE, workers=1)
    return root


@pytest.fixture
def cohort_copy(cohort18, tmp_path) -> Path:
    dst = tmp_path / "cohort"
    shutil.copytree(cohort18, dst)
    return dst


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None) -> None:
    """Write a (z, y, x) array as NIfTI with LPS identity direction unless given."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def case_dirs(root: Path) -> list[Path]:
    return sorted(p for g in ("HGG", "LGG") for p in (root / g).iterdir())


@pytest.fixture(scope="session")
def cache20(tmp_path_factory) -> Path:
    """A prepared cache of 20 tiny patients (15 HGG, 5 LGG): enough for 5 stratified folds."""
    from brats.cache import prepare
    from brats.cohort import find_cases
    from brats.preprocess import PreprocessConfig

    base = tmp_path_factory.mktemp("c20")
    make_cohort(base / "cohort", 20, seed=11, shape=TINY_SHAPE, workers=1)
    prepare(
        find_cases(base / "cohort").cases,
        base / "cache",
        PreprocessConfig(size=TINY_SIZE),
        workers=2,
        progress=False,
    )
    return base / "cache"


@pytest.fixture
def fresh_accelerate():
    """In-process training creates an Accelerator; reset its global state afterwards."""
    yield
    reset_accelerate()


# Small, fast training settings shared by the training tests (depth 10, tiny cubes, no workers).
FAST = dict(depth=10, workers=0, progress=False, min_epochs=1, warmup_epochs=1.0)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_cv(cache: Path, run: Path, policy: str = "final", **overrides) -> Path:
    """Train every fold of a tiny CV run in-process."""
    from brats.config import make_config
    from brats.engine import train_fold

    settings = {**FAST, **overrides}
    for k in range(settings.get("folds", 5)):
        train_fold(make_config(policy, data=str(cache), run=str(run), fold=k, **settings))
        reset_accelerate()
    return run


@pytest.fixture(scope="session")
def cv_run(cache20, tmp_path_factory) -> Path:
    """A finished 5-fold run with EMA on (read-only: copy before changing it)."""
    return train_cv(cache20, tmp_path_factory.mktemp("cv") / "run", max_epochs=2, ema_decay=0.9)


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


@pytest.fixture
def cv_copy(cv_run, tmp_path) -> Path:
    return copy_run(cv_run, tmp_path / "run")
