"""Files that are either whole or absent, and output paths checked before any work starts.

Every file brats writes goes through `atomic_path`: the content is written to a temp file in the
same folder (`.tmp-<pid>-<name>.part`), fsynced, then `os.replace`d over the target, so a kill,
a full disk or an error never leaves a torn file and never damages the previous version. Temp
files left by a killed process are removed by the next run (`remove_stale_temps`); the pid in
the name keeps a live writer's file safe.

No torch here: predict.py writes its CSV with it.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from brats.errors import BratsError
from brats.io.processes import pid_alive

TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".part"

# What to do about the OSErrors a user can meet when writing, by errno.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exceeded: free some space",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another path",
    errno.EEXIST: "a path component is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: give a file name",
    errno.ENAMETOOLONG: "the name is too long",
}


FULL_BELOW = 16 * 2**20  # free bytes under which a write error without an errno means a full disk


def write_error(path: Path, e: OSError) -> BratsError:
    """A one-line error for a failed write of `path` that says how to fix it. Some writers (numpy's
    tofile, torch.save) report a full disk without an errno: the free space tells."""
    advice = _ADVICE.get(e.errno or 0)
    if advice is None:
        try:
            full = shutil.disk_usage(Path(path).parent).free < FULL_BELOW
        except OSError:
            full = False
        said = str(e.strerror or e).strip().splitlines() or [type(e).__name__]
        advice = _ADVICE[errno.ENOSPC] if full else said[0][:160]
    return BratsError(f"cannot write {path}: {advice}; nothing was written there")


def temp_path(path: Path) -> Path:
    # A name no reader's glob (*.npy, *.pt, *.onnx, *.json) matches.
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write to; on success it is fsynced and renamed over
    `path`, on any error it is removed and `path` is left as it was. OSErrors become one line."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder holds no temp file of ours


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(fileobj)` on a temp file beside `path`, then rename it over `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def read_json_object(path: str | Path) -> dict:
    """A JSON file that holds an object. An unreadable file is one line (BratsError); text that is
    not JSON, or not an object, raises ValueError for the caller to say which file and the fix."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BratsError(f"cannot read {path} ({e.strerror}): check its permissions") from e
    d = json.loads(text)  # JSONDecodeError is a ValueError
    if not isinstance(d, dict):
        raise ValueError(f"a JSON {type(d).__name__}, not an object")
    return d


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_csv_atomic(path: str | Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """A CSV with a header row, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames or (list(rows[0]) if rows else []))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files (or staging folders) a killed writer left in `folder` (not those of
    a live process)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        pid = tmp.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        try:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def check_output_dir(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and check that files can be written in it, before any work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BratsError(f"{what} {folder} is a file, not a folder: choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "write-check")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        advice = _ADVICE.get(e.errno or 0, e.strerror or type(e).__name__)
        raise BratsError(f"cannot write {what} in {folder}: {advice}") from e
    return folder


def check_output_file(path: str | Path, what: str) -> Path:
    """Check, before any work, that `path` can be written: not a folder, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise BratsError(f"{what} {path} is a folder: give a file name, e.g. {path / 'predictions.csv'}")
    check_output_dir(path.parent, what)
    return path


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temp folder inside `out` to write every result into; on success each file is fsynced and
    renamed to its place in `out`, so a full disk or an error leaves the previous results whole."""
    stage = temp_path(out / "evaluation")
    try:
        stage.mkdir()
        yield stage
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        for f in files:
            target = out / f.relative_to(stage)
            target.parent.mkdir(exist_ok=True)
            os.replace(f, target)
        fsync_dir(out)
    except OSError as e:
        raise write_error(out, e) from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    """`a` and `b` name the same file or folder: after following symlinks, or as hard links."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def refuse_inputs(out: str | Path, protected: dict[Path, str], what: str) -> None:
    """Refuse to write `what` at `out` when it is (symlinks and hard links followed) one of the
    files or folders the command reads or must keep: `protected` maps each to what it is
    ("the model", "patient X's t1 scan")."""
    out = Path(out)
    for path, name in protected.items():
        if _same_file(out, Path(path)):
            raise BratsError(
                f"{what} {out} is {name} ({path}): writing there would destroy it; choose another path"
            )


def refuse_other_kind(out: str | Path, looks_right: Callable[[bytes], bool], kind: str, what: str) -> None:
    """An existing file at `out` is replaced only when it is the kind of file the command writes
    (`looks_right` judges its first bytes): a path given by mistake never replaces a scan, a
    model or a checkpoint."""
    out = Path(out)
    if not out.is_file():
        return
    try:
        with open(out, "rb") as f:
            head = f.read(256)
    except OSError as e:
        raise BratsError(f"{what} {out} exists and cannot be read ({e.strerror}): choose another path") from e
    if head and not looks_right(head):
        raise BratsError(
            f"{what} {out} exists and is not {kind}: choose another file name (or remove the file "
            "yourself if it may go)"
        )
