"""Shared fixtures: tiny synthetic cohorts and runs, made once per session (helpers: support.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import TINY_SHAPE, copy_run, prepared_cohort, reset_accelerate, train_cv

from brats.data.phantom import make_cohort


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


@pytest.fixture(scope="session")
def cache20(tmp_path_factory) -> Path:
    """A prepared cache of 20 tiny patients (15 HGG, 5 LGG): enough for 5 stratified folds."""
    return prepared_cohort(tmp_path_factory.mktemp("c20"), 20, seed=11)


@pytest.fixture
def fresh_accelerate():
    """In-process training creates an Accelerator; reset its global state afterwards."""
    yield
    reset_accelerate()


@pytest.fixture(scope="session")
def cv_run(cache20, tmp_path_factory) -> Path:
    """A finished 5-fold run with EMA on (read-only: copy before changing it)."""
    return train_cv(cache20, tmp_path_factory.mktemp("cv") / "run", max_epochs=2, ema_decay=0.9)


@pytest.fixture
def cv_copy(cv_run, tmp_path) -> Path:
    return copy_run(cv_run, tmp_path / "run")


@pytest.fixture(scope="session")
def exported(cv_run, tmp_path_factory):
    """cv_run evaluated and its best fold exported: (run folder, model.onnx); read-only."""
    from brats.evaluation.cross_validation import evaluate_run
    from brats.evaluation.export import export

    run = tmp_path_factory.mktemp("deploy") / "run"
    copy_run(cv_run, run)
    evaluate_run(run)
    return run, export(run)
