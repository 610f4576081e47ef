"""Atomic files: whole or absent, one-line errors, stale temps removed, outputs checked early."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from clitools import deny_writes

from brats.errors import BratsError
from brats.io.atomic import (
    atomic_path,
    check_output_dir,
    check_output_file,
    remove_stale_temps,
    temp_path,
    write_atomic,
    write_json_atomic,
)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"auc": 0.9})

    def boom(f):
        f.write(b'{"half": ')
        raise ValueError("interrupted")

    with pytest.raises(ValueError):
        write_atomic(path, boom)
    assert path.read_text().strip().startswith('{\n  "auc": 0.9')
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_full_disk_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "model.onnx"

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BratsError) as e:
        write_atomic(path, full)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "disk is full" in msg
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_read_only_folder_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with deny_writes(ro):
        with pytest.raises(BratsError, match="permission denied"):
            check_output_dir(ro, "predictions")


def test_file_where_a_folder_is_needed(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    with pytest.raises(BratsError, match="is a file, not a folder"):
        check_output_dir(blocker, "--out")
    with pytest.raises(BratsError, match="is a file, not a folder"):
        check_output_file(blocker / "predictions.csv", "--out")
    with pytest.raises(BratsError, match="is a file, not a folder|a path component is a file"):
        with atomic_path(blocker / "x.json") as tmp:
            tmp.write_bytes(b"{}")


def test_folder_where_a_file_is_needed(tmp_path):
    with pytest.raises(BratsError, match="is a folder: give a file name"):
        check_output_file(tmp_path, "--out")
    # a missing parent is created
    assert check_output_file(tmp_path / "a" / "b.csv", "--out").parent.is_dir()


def test_stale_temps_of_dead_writers_are_removed_not_those_of_live_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".tmp-{dead_pid}-best.pt.part"
    stale.write_bytes(b"x" * 10)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy = tmp_path / f".tmp-{live.pid}-model.onnx.part"
        busy.write_bytes(b"y")
        keep = tmp_path / "best.pt"
        keep.write_bytes(b"z")
        removed = remove_stale_temps(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert removed == [stale]
    assert busy.exists() and keep.exists() and not stale.exists()


def test_temp_names_match_no_reader_glob(tmp_path):
    for name in ("a.npy", "best.pt", "model.onnx", "index.json"):
        tmp = temp_path(tmp_path / name)
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-") and tmp.suffix == ".part"
