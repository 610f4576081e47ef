"""The cache under damage: awkward patient ids, broken volumes and index, kills, bad options."""

import dataclasses
import json
import os

import numpy as np
import pytest
from conftest import TINY_SIZE

from brats.cache import open_cache, prepare
from brats.cohort import find_cases
from brats.preprocess import PreprocessConfig

CFG = PreprocessConfig(size=TINY_SIZE)


def renamed(cases, ids):
    """The first len(ids) cases of a cohort under other patient ids."""
    return [dataclasses.replace(c, patient_id=pid) for c, pid in zip(cases, ids)]


def files_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "ids",
    [
        ["X", "X.bak"],
        ["Case1", "Case[1]"],
        ["Case1", "Case?"],
        ["a", "a*"],
        ["P1", "P1.1"],
    ],
)
def test_redoing_one_patient_keeps_the_others_volumes(cohort_copy, tmp_path, ids):
    cases = renamed(find_cases(cohort_copy).cases, ids)
    cache = tmp_path / "cache"
    prepare(cases, cache, CFG, workers=1, progress=False)
    # redo each patient in turn: the redo of one must not delete the volume of another whose
    # id reads as a pattern matching the first, or the other way round
    for i, case in enumerate(cases):
        os.utime(case.paths[0], ns=(i + 1, i + 1))
        again = prepare(cases, cache, CFG, workers=1, progress=False)
        assert again.written == [case.patient_id] and len(again.reused) == len(ids) - 1
        cached = open_cache(cache)  # every listed volume still exists
        assert cached.patient_ids == ids
        assert len(list((cache / "volumes").glob("*.npy"))) == len(ids)  # the old volume is gone


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", ".", "/abs/path", "sp ace\tand\nnew"])
def test_ids_with_path_characters_stay_inside_the_cache(cohort_copy, tmp_path, bad):
    cases = renamed(find_cases(cohort_copy).cases, [bad, "ok"])
    cache = tmp_path / "out" / "deep" / "cache"
    result = prepare(cases, cache, CFG, workers=1, progress=False)
    assert not result.failed and sorted(result.written) == sorted([bad, "ok"])
    assert files_in(tmp_path / "out") == sorted(f"deep/cache/{f}" for f in files_in(cache))
    assert all(f.startswith("volumes/") or f == "index.json" for f in files_in(cache))
    cached = open_cache(cache)
    assert cached.patient_ids == [bad, "ok"]
    assert np.isfinite(np.asarray(cached.volumes[0], dtype=np.float32)).all()
    assert json.loads((cache / "index.json").read_text())["patients"][0]["patient_id"] == bad
