import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from support import TINY_SIZE, case_dirs, make_brats20

from brats.data.cache_builder import prepare
from brats.data.cache_reader import open_cache
from brats.data.cohort import find_cases
from brats.data.preprocess import PreprocessConfig, preprocess_case
from brats.errors import BratsError
from brats.io.names import file_stem

CFG = PreprocessConfig(size=TINY_SIZE)


def snapshot(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_prepare_is_idempotent_and_incremental(cohort_copy, tmp_path):
    cache = tmp_path / "cache"
    cases = find_cases(cohort_copy).cases
    first = prepare(cases, cache, CFG, workers=2, progress=False)
    assert len(first.written) == 14 and first.index_written and not first.failed
    before = snapshot(cache)
    again = prepare(cases, cache, CFG, workers=2, progress=False)
    assert again.written == [] and not again.index_written
    assert snapshot(cache) == before  # an unchanged cohort writes nothing

    # a changed patient is the only one redone, and its old volume is removed
    changed = cases[3]
    os.utime(changed.paths[2], ns=(time.time_ns(), time.time_ns()))
    third = prepare(cases, cache, CFG, workers=1, progress=False)
    assert third.written == [changed.patient_id]
    assert len(list((cache / "volumes").glob(f"{file_stem(changed.patient_id)}.*.npy"))) == 1

    # a changed parameter is refused unless asked, then redoes everyone, and only their volumes stay
    with pytest.raises(BratsError, match="size 24 -> 28.*--replace"):
        prepare(cases, cache, PreprocessConfig(size=TINY_SIZE + 4), workers=2, progress=False)
    assert open_cache(cache).preprocess["size"] == TINY_SIZE  # nothing changed
    fourth = prepare(
        cases, cache, PreprocessConfig(size=TINY_SIZE + 4), workers=2, progress=False, replace=True
    )
    assert len(fourth.written) == 14 and len(list((cache / "volumes").iterdir())) == 14


def test_cache_contents_and_memmap(cohort18, tmp_path):
    cases = find_cases(cohort18).cases
    prepare(cases, tmp_path / "c", CFG, workers=1, progress=False)
    cached = open_cache(tmp_path / "c")
    assert cached.patient_ids == [c.patient_id for c in cases]
    assert list(cached.labels) == [c.label for c in cases]
    assert isinstance(cached.volumes[0], np.memmap) and cached.volumes[0].dtype == np.float16
    np.testing.assert_allclose(cached.volumes[5], preprocess_case(cases[5], CFG).astype(np.float16))
    assert cached.preprocess["size"] == TINY_SIZE and cached.preprocess["version"] >= 1


def run_prepare(root, out, *extra, size=TINY_SIZE):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "brats.prepare",
            str(root),
            "--out",
            str(out),
            "--size",
            str(size),
            "--no-progress",
            *extra,
        ],
        capture_output=True,
        text=True,
    )


def test_failed_patients_listed_then_skip_bad(cohort_copy, tmp_path):
    dirs = case_dirs(cohort_copy)
    (dirs[0] / f"{dirs[0].name}_flair.nii.gz").unlink()
    (dirs[5] / f"{dirs[5].name}_t1.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "cache"
    r = run_prepare(cohort_copy, out, "--workers", "2")
    assert r.returncode == 1
    assert f"{dirs[0].name}: missing modality flair" in r.stderr
    assert f"{dirs[5].name}: cannot read t1 file" in r.stderr
    assert not (out / "index.json").exists()  # no index for a partial cohort without --skip-bad
    assert len(list((out / "volumes").glob("*.npy"))) == 12  # the others were still processed

    r = run_prepare(cohort_copy, out, "--skip-bad")
    assert r.returncode == 1 and "2 patient(s) failed" in r.stderr
    assert "12 unchanged" in r.stdout  # the good patients were not redone
    index = json.loads((out / "index.json").read_text())
    assert len(index["patients"]) == 12 and len(index["skipped"]) == 2


def test_kill_during_prepare_then_rerun_completes(cohort18, tmp_path):
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-m",
        "brats.prepare",
        str(cohort18),
        "--out",
        str(out),
        "--size",
        "128",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "volumes").glob("*.npy"))) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((out / "volumes").glob("*.npy"))
    assert 3 <= len(done) < 14, "the kill must land part-way"
    assert not (out / "index.json").exists()
    for f in done:
        assert np.load(f).shape == (4, 128, 128, 128)  # every named volume is complete

    r = run_prepare(cohort18, out, "--workers", "2", size=128)
    assert r.returncode == 0, r.stderr
    assert f"{14 - len(done)} preprocessed, {len(done)} unchanged" in r.stdout
    assert r.stdout.splitlines()[-1] == (
        f"next: accelerate launch train.py --data {out} --run runs/cv --fold all --resume   "
        f"(or make cv DATA={out})"
    )
    cached = open_cache(out)
    assert len(cached) == 14
    assert not [p for p in (out / "volumes").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("layout", ["brats18", "brats20"])
def test_cli_on_both_layouts(cohort18, tmp_path, layout):
    root = cohort18 if layout == "brats18" else make_brats20(cohort18, tmp_path / "brats20")
    r = run_prepare(root, tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "14 patients: 10 HGG, 4 LGG" in r.stdout
    cached = open_cache(tmp_path / "cache")
    assert sorted(cached.labels.tolist()) == [0] * 4 + [1] * 10
