"""Running the command-line scripts in-process, and folders that refuse writes."""

from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys, script: str, *args: str | Path) -> Result:
    """Run ROOT/script as `python script args...` in this process (so that monkeypatches apply)."""
    argv = sys.argv
    sys.argv = [str(ROOT / script), *map(str, args)]
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def one_line_error(r: Result) -> str:
    """The CLI failed with exactly one `error: ...` line on stderr and no traceback."""
    assert r.code == 1, (r.code, r.out[-2000:], r.err[-2000:])
    assert "Traceback" not in r.err, r.err[-3000:]
    lines = [line for line in r.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.err[-3000:]
    return lines[0]


@contextmanager
def deny_writes(folder: Path) -> Iterator[None]:
    """`folder` is read-only inside the block. As root the permission bits do not bind, so then
    every attempt to create, open for writing or rename a file below it fails with EACCES, as it
    would for a user."""
    folder.chmod(0o555)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if os.access(folder, os.W_OK):
                _refuse_writes_below(mp, folder.resolve())
            yield
    finally:
        folder.chmod(0o755)


def _refuse_writes_below(mp: pytest.MonkeyPatch, folder: Path) -> None:
    def inside(path) -> bool:
        if isinstance(path, int):  # a file descriptor
            return False
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(folder)

    def denied(path) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_open, real_mkdir, real_replace = builtins.open, os.mkdir, os.replace

    def guarded_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    def guarded_replace(src, dst, *args, **kwargs):
        if inside(dst):
            raise denied(dst)
        return real_replace(src, dst, *args, **kwargs)

    mp.setattr(builtins, "open", guarded_open)
    mp.setattr(io, "open", guarded_open)
    mp.setattr(os, "mkdir", guarded_mkdir)
    mp.setattr(os, "replace", guarded_replace)


def disk_full(monkeypatch) -> None:
    """Every fsync fails as on a full disk (where a delayed write error surfaces)."""

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


def temps(folder: Path) -> list[Path]:
    """Temporary files or folders left anywhere below `folder`."""
    return [p for p in folder.rglob(".tmp-*")]
