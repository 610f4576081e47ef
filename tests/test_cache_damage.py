"""The cache under damage: awkward patient ids, broken volumes and index, kills, bad options."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import TINY_SIZE, alive, descendants, eventually

from brats.data.cache_builder import prepare
from brats.data.cache_reader import open_cache
from brats.data.cohort import find_cases
from brats.data.preprocess import PreprocessConfig

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


def damage(path, how):
    """Damage a cached volume file in place the ways disks, copies and people do."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "header":
        data[:40] = os.urandom(40)
        path.write_bytes(bytes(data))
    elif how == "shape":  # a valid header that declares another shape
        np.save(path, np.zeros((4, 2, 2, 2), np.float16))
    elif how == "nan":  # the data garbled into NaNs, the header intact
        data[-64:] = np.full(32, np.nan, np.float16).tobytes()
        path.write_bytes(bytes(data))
    elif how == "bytes":  # the data garbled into other finite values
        data[-64:] = np.full(32, 3.0, np.float16).tobytes()
        path.write_bytes(bytes(data))
    elif how == "appended":
        path.write_bytes(bytes(data) + b"\0" * 128)
    else:
        raise AssertionError(how)


DAMAGES = ["truncated", "emptied", "header", "shape", "nan", "bytes", "appended"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A cohort of 4 tiny patients and its cache (read-only: copy the cache before damaging it)."""
    from support import TINY_SHAPE

    from brats.data.phantom import make_cohort

    base = tmp_path_factory.mktemp("prepared")
    make_cohort(base / "cohort", 4, seed=5, shape=TINY_SHAPE, workers=1)
    cases = find_cases(base / "cohort").cases
    prepare(cases, base / "cache", CFG, workers=1, progress=False, source=str(base / "cohort"))
    return cases, base / "cache"


def copy_cache(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def volume_of(cache, position):
    entry = json.loads((cache / "index.json").read_text())["patients"][position]
    return entry["patient_id"], cache / entry["file"]


@pytest.mark.parametrize("how", DAMAGES)
def test_prepare_redoes_a_broken_volume_and_says_so(prepared, tmp_path, how):
    cases, clean = prepared
    cache = copy_cache(clean, tmp_path / "cache")
    pid, path = volume_of(cache, 2)
    damage(path, how)
    result = prepare(cases, cache, CFG, workers=1, progress=False, source=str(clean.parent / "cohort"))
    assert result.written == [pid] and len(result.reused) == 3 and not result.failed
    assert len(result.repaired) == 1 and result.repaired[0].startswith(f"{pid}: ")
    assert path.name in result.repaired[0]
    np.testing.assert_array_equal(np.load(path), np.load(clean / path.relative_to(cache)))
    assert not result.index_written  # the same volume again: the index is unchanged


@pytest.mark.parametrize("how", DAMAGES)
def test_training_on_a_broken_volume_names_it_in_one_line(prepared, tmp_path, how):
    from brats.errors import BratsError
    from brats.training.datasets import CachedVolumes

    _, clean = prepared
    cache = copy_cache(clean, tmp_path / "cache")
    pid, path = volume_of(cache, 1)
    damage(path, how)
    with pytest.raises(BratsError) as e:
        cached = open_cache(cache)
        ds = CachedVolumes(cached, list(range(len(cached))), ("t1", "t1ce", "t2", "flair"))
        for i in range(len(ds)):
            x, _ = ds[i]
            assert torch_finite(x)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{pid}: ") and path.name in msg
    assert "rerun python -m brats.prepare" in msg and str(cache) in msg


def torch_finite(x):
    import torch

    return bool(torch.isfinite(x).all())


def test_a_volume_cut_short_during_training_is_one_line_in_a_loader_worker(prepared, tmp_path):
    from torch.utils.data import DataLoader

    from brats.errors import BratsError
    from brats.training.datasets import CachedVolumes

    _, clean = prepared
    cache = copy_cache(clean, tmp_path / "cache")
    cached = open_cache(cache)
    ds = CachedVolumes(cached, list(range(len(cached))), ("t1", "t1ce", "t2", "flair"))
    pid, path = volume_of(cache, 3)
    damage(path, "truncated")  # after the checks at the start: reading its memory map would SIGBUS
    with pytest.raises(BratsError) as e:
        list(DataLoader(ds, batch_size=2, num_workers=1))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{pid}: cached volume {path} changed during training")
    assert "rerun python -m brats.prepare" in msg


@pytest.mark.parametrize("how", ["nan", "bytes", "truncated"])
def test_the_resident_path_checks_each_volume_it_loads(prepared, tmp_path, how):
    import torch

    from brats.errors import BratsError
    from brats.training.datasets import ResidentVolumes

    _, clean = prepared
    cache = copy_cache(clean, tmp_path / "cache")
    cached = open_cache(cache)
    pid, path = volume_of(cache, 3)
    damage(path, how)
    with pytest.raises(BratsError) as e:
        ResidentVolumes(cached, list(range(len(cached))), ("t1", "flair"), torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{pid}: cached volume {path}")
    assert "rerun python -m brats.prepare" in msg


INDEX_DAMAGES = {
    "garbage": os.urandom(200),
    "empty": b"",
    "truncated": None,  # the first half of the real index
    "list": b"[]",
    "no patients": b'{"preprocess": {"size": 24, "modalities": ["t1"]}}',
    "patients not a list": b'{"preprocess": {"size": 24, "modalities": ["t1"]}, "patients": 3}',
    "entry without file": None,  # the real index with one entry's file removed
    "file outside": None,  # the real index with one entry's file pointing outside the cache
}


def damage_index(cache, how):
    path = cache / "index.json"
    text = path.read_text()
    index = json.loads(text)
    if how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "entry without file":
        del index["patients"][1]["file"]
        path.write_text(json.dumps(index))
    elif how == "file outside":
        index["patients"][1]["file"] = "volumes/../../../outside.npy"
        path.write_text(json.dumps(index))
    else:
        path.write_bytes(INDEX_DAMAGES[how])


@pytest.mark.parametrize("how", list(INDEX_DAMAGES))
def test_a_damaged_index_is_rebuilt_by_prepare_and_named_by_training(prepared, tmp_path, how):
    from brats.errors import BratsError

    cases, clean = prepared
    cache = copy_cache(clean, tmp_path / "cache")
    damage_index(cache, how)
    with pytest.raises(BratsError) as e:
        open_cache(cache)
    msg = str(e.value)
    assert "\n" not in msg and str(cache / "index.json") in msg and "rerun python -m brats.prepare" in msg

    result = prepare(cases, cache, CFG, workers=1, progress=False, source=str(clean.parent / "cohort"))
    assert result.index_written and len(result.reused) == 4 and not result.written
    assert result.index_problem.startswith(str(cache / "index.json"))
    assert (cache / "index.json").read_text() == (clean / "index.json").read_text()
    assert open_cache(cache).patient_ids == [c.patient_id for c in cases]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_prepare_takes_its_workers_with_it(cohort18, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "brats.prepare", str(cohort18), "--out", str(out), "--size", "128"]
    proc = subprocess.Popen([*cmd, "--workers", "2", "--no-progress"], stdout=subprocess.DEVNULL)
    workers = []
    try:
        assert eventually(lambda: any((out / "volumes").glob("*.npy")), 120), "no volume was written"
        workers = descendants(proc.pid)
        assert workers, "prepare runs its patients in worker processes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert eventually(lambda: not any(alive(w) for w in workers), 5), "a worker outlived prepare"
    finally:  # never leave a process of this test behind, whatever failed
        proc.kill()
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
    assert not (out / "index.json").exists()
    # a temp file like the one a killed index write leaves, named after a process that is gone
    (out / f".tmp-{proc.pid}-index.json.part").write_text("{")

    r = subprocess.run([*cmd, "--workers", "2", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(open_cache(out)) == 14
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


POOL_WITHOUT_PRCTL = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
import brats.data.cache_builder as builder
import brats.io.processes as processes

processes.arm_parent_death_signal = lambda sig: False  # as where prctl is missing: the thread must do
with ProcessPoolExecutor(1, initializer=builder._init_worker, initargs=(os.getpid(),)) as pool:
    print(pool.submit(os.getpid).result(), flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_without_prctl_a_thread_ends_the_worker_when_its_parent_dies():
    proc = subprocess.Popen([sys.executable, "-c", POOL_WITHOUT_PRCTL], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert eventually(lambda: not alive(worker), 5), "the worker outlived its parent"
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def one_line_error(r):
    """The CLI failed with one line on stderr (no traceback) and exit status 1."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("size", ["0", "-3", "8", "15", "513", "100000"])
def test_prepare_refuses_a_size_outside_the_range_up_front(cohort18, tmp_path, size):
    out = tmp_path / "cache"
    line = one_line_error(run_cli("brats.prepare", str(cohort18), "--out", str(out), "--size", size))
    assert f"--size {size}" in line and "16 to 512" in line
    assert not out.exists()  # nothing written


def test_the_smallest_and_largest_sizes_are_accepted():
    from brats.data.cache_builder import SIZE_MAX, SIZE_MIN, check_size

    assert (SIZE_MIN, SIZE_MAX) == (16, 512)
    for ok in (SIZE_MIN, 128, SIZE_MAX):
        check_size(ok)


@pytest.mark.parametrize(
    "where", ["out is a file", "parent is a file", "volumes is a file", "index is a folder"]
)
def test_prepare_checks_the_output_folder_up_front(cohort18, tmp_path, where):
    out = tmp_path / "cache"
    if where == "out is a file":
        out.write_text("x")
    elif where == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "cache"
    elif where == "volumes is a file":
        out.mkdir()
        (out / "volumes").write_text("x")
    else:
        (out / "index.json").mkdir(parents=True)
    before = files_in(tmp_path)
    line = one_line_error(run_cli("brats.prepare", str(cohort18), "--out", str(out), "--size", "24"))
    assert str(out) in line
    assert files_in(tmp_path) == before  # nothing half-written


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_stops_prepare_with_one_line_and_loses_nothing(prepared, tmp_path, monkeypatch, workers):
    import errno

    from brats.errors import BratsError

    cases, clean = prepared
    cache = copy_cache(clean, tmp_path / "cache")
    before = {f: f.read_bytes() for f in cache.rglob("*") if f.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)  # forked workers inherit it
    with pytest.raises(BratsError) as e:
        prepare(
            cases, cache, PreprocessConfig(size=TINY_SIZE + 2), workers=workers, progress=False, replace=True
        )
    assert "\n" not in str(e.value) and "the disk is full" in str(e.value)
    after = {f: f.read_bytes() for f in cache.rglob("*") if f.is_file()}
    assert after == before  # no temp file, no new volume, the old volumes and index intact


def test_prepare_cli_says_what_it_redid(prepared, tmp_path):
    _, clean = prepared
    cache = copy_cache(clean, tmp_path / "cache")
    pid, path = volume_of(cache, 0)
    damage(path, "bytes")
    (cache / "index.json").write_text("{")
    r = run_cli("brats.prepare", str(clean.parent / "cohort"), "--out", str(cache), "--size", str(TINY_SIZE))
    assert r.returncode == 0, r.stderr
    # the index was unreadable, so no checksum tells the garbled volume apart: its values are
    # finite and it is adopted, while the index is rebuilt
    assert f"{cache / 'index.json'} is not valid JSON" in r.stdout and "rebuilt" in r.stdout
    damage(path, "nan")
    r = run_cli("brats.prepare", str(clean.parent / "cohort"), "--out", str(cache), "--size", str(TINY_SIZE))
    assert r.returncode == 0, r.stderr
    assert f"{pid}: cached volume {path} does not match the checksum" in r.stdout
    # redone, it gets its right checksum again
    assert "1 preprocessed, 3 unchanged, 0 failed; index written" in r.stdout
    assert (cache / "index.json").read_text() == (clean / "index.json").read_text()


def test_ensure_prepared_logs_and_never_prints(cohort_copy, caplog, capsys):
    import logging

    from brats.data.cache_reader import ensure_prepared

    with caplog.at_level(logging.INFO, logger="brats.data.cache_reader"):
        out = ensure_prepared(cohort_copy, TINY_SIZE)
        pid, path = volume_of(out, 4)
        damage(path, "truncated")
        assert ensure_prepared(cohort_copy, TINY_SIZE) == out
    assert capsys.readouterr().out == ""  # every training process calls it: stdout stays clean
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "brats.data.cache_reader"]
    assert (
        "INFO",
        f"{cohort_copy}: 14 patients: 10 HGG, 4 LGG (HGG:LGG 2.50:1); preparing into {out}",
    ) in messages
    assert any(
        level == "WARNING" and m.startswith(f"{pid}: cached volume {path} is truncated")
        for level, m in messages
    )


@pytest.mark.parametrize("how", ["nan", "truncated"])
def test_train_py_on_a_broken_volume_stops_with_one_line(cache20, tmp_path, how):
    cache = copy_cache(cache20, tmp_path / "cache")
    pid, path = volume_of(cache, 7)
    damage(path, how)
    r = subprocess.run(
        [sys.executable, "train.py", "--data", str(cache), "--run", str(tmp_path / "run"), "--cpu"]
        + ["--depth", "10", "--max-epochs", "1", "--min-epochs", "1", "--warmup-epochs", "1"]
        + ["--workers", "1", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "nan" not in r.stderr.lower().replace(pid.lower(), "")
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {pid}: cached volume {path}") and "rerun python -m brats.prepare" in last


def make_legacy(cache):
    """Turn a cache into what earlier versions wrote: volumes/<id>.<fp>.npy, no checksums."""
    index = json.loads((cache / "index.json").read_text())
    for e in index["patients"]:
        legacy = f"volumes/{e['patient_id']}.{e['fingerprint']}.npy"
        (cache / e["file"]).rename(cache / legacy)
        e["file"] = legacy
        del e["crc32"]
    (cache / "index.json").write_text(json.dumps(index, indent=2))
    return index


def test_a_cache_of_earlier_versions_trains_checked_and_is_adopted_by_prepare(prepared, tmp_path):
    """Volumes named `<id>.<fp>.npy` without checksums (the earliest caches): a plain id names its
    files as it is again, so prepare reuses them after checking them, adds their checksums and
    redoes only the damaged one."""
    from brats.errors import BratsError
    from brats.training.datasets import CachedVolumes

    cases, clean = prepared
    cache = copy_cache(clean, tmp_path / "cache")
    index = make_legacy(cache)
    mods = ("t1", "t1ce", "t2", "flair")
    cached = open_cache(cache)
    assert len(CachedVolumes(cached, [0, 1, 2, 3], mods)) == 4
    damage(cache / index["patients"][2]["file"], "nan")  # without a checksum, NaN is still caught
    with pytest.raises(BratsError, match=f"^{index['patients'][2]['patient_id']}: .* NaN"):
        CachedVolumes(open_cache(cache), [0, 1, 2, 3], mods)

    result = prepare(cases, cache, CFG, workers=1, progress=False, source=str(clean.parent / "cohort"))
    assert result.written == [index["patients"][2]["patient_id"]] and result.index_written
    assert len(result.reused) == 3
    assert files_in(cache) == files_in(clean)
    assert (cache / "index.json").read_text() == (clean / "index.json").read_text()
