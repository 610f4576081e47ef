"""A prepared cache on disk: its index and its volume files, the checks both pass to be used.

Layout of a cache folder:
    index.json                      preprocessing contract + one entry per usable patient
    volumes/<stem>.<fp>.npy         float16 (C, S, S, S), one file per patient

The stem comes from the patient id (brats.io.names). The fingerprint of a patient is a hash of
the preprocessing contract (which includes the preprocessing version) and the size and mtime of
each source file, and it is part of the file name: a file exists only once it is complete (temp
file + fsync + rename), so a run killed at any point leaves no partial entry.

A file that exists can still be damaged afterwards (a disk, a copy, a person): index.json holds
the CRC-32 of each volume's data, taken when it was written; readers check it.

No torch here.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np

from brats.errors import BratsError
from brats.io.compression import checksum
from brats.io.names import file_stem, hashed_stem

INDEX = "index.json"
VOLUMES = "volumes"
DTYPE = np.dtype(np.float16)
_HEX = frozenset("0123456789abcdef")


class BrokenVolumeError(BratsError):
    """A cached volume (or the index) is missing or damaged; the message says to rerun prepare."""

    def __init__(self, message: str):
        # A DataLoader worker's exception reaches the main process rebuilt as
        # type(e)("Caught ... Original Traceback ... <module>.<type>: <message>"): keep the
        # message line, so the command line still prints one line.
        marker = f"{type(self).__name__}: "
        last = message.rstrip("\n").rsplit("\n", 1)[-1]
        if "\n" in message.strip() and marker in last:
            message = last.split(marker, 1)[1]
        super().__init__(message)


class Broken(Exception):
    """Why a cached file cannot be used (a phrase: "is truncated ...")."""


def all_finite(volume: np.ndarray) -> bool:
    """No NaN or infinity in a float16 array: exponent bits all set means not finite (one pass
    over the bits, cheaper than np.isfinite on float16)."""
    return not bool(((volume.view(np.uint16) & 0x7C00) == 0x7C00).any())


def volume_header(path: Path, shape: tuple[int, ...]) -> int:
    """Check a .npy file's header and size against a float16 `shape` without reading its data;
    returns where the data starts."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise Broken("is empty")
            try:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                read = read or np.lib.format.read_array_header_2_0
                got_shape, fortran, dtype = read(f)
            except (ValueError, EOFError, SyntaxError, TypeError) as e:
                raise Broken("is not a readable .npy file (damaged header)") from e
            offset = f.tell()
    except FileNotFoundError as e:
        raise Broken("is missing") from e
    except IsADirectoryError as e:
        raise Broken("is a folder") from e
    except OSError as e:
        raise Broken(f"cannot be read ({e.strerror or type(e).__name__})") from e
    if dtype != DTYPE or fortran:
        raise Broken(f"holds {dtype}{' (Fortran order)' if fortran else ''}, not float16")
    if tuple(got_shape) != tuple(shape):
        raise Broken(f"has shape {tuple(got_shape)}, not {tuple(shape)}")
    want = offset + int(np.prod(shape)) * DTYPE.itemsize
    if size != want:
        raise Broken(f"is {'truncated' if size < want else 'too long'} ({size} bytes, not {want})")
    return offset


def read_volume(path: Path, shape: tuple[int, ...], crc32: int | None) -> tuple[np.ndarray, int]:
    """Read a float16 volume whole and check it: header and size, the checksum taken when it was
    written (when there is one), and that every value is finite. Returns the volume and its
    checksum."""
    offset = volume_header(path, shape)
    volume = np.empty(shape, DTYPE)
    buf = memoryview(volume).cast("B")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            n = f.readinto(buf)
    except OSError as e:
        raise Broken(f"cannot be read ({e.strerror or type(e).__name__})") from e
    if n != len(buf):
        raise Broken(f"is truncated ({offset + n} bytes, not {offset + len(buf)})")
    crc = checksum(buf)
    if crc32 is not None and crc != crc32:
        raise Broken("does not match the checksum taken when it was written (damaged data)")
    if not all_finite(volume):  # also under a matching checksum: an index written by hand
        raise Broken("holds NaN or infinite values")
    return volume, crc


def rerun_hint(root: Path, source: str = "", size: int | None = None) -> str:
    """The command that rebuilds the cache at `root`."""
    cohort = shlex.quote(source) if source else "COHORT"
    return f"rerun python -m brats.prepare {cohort} --out {shlex.quote(str(root))}" + (
        f" --size {size}" if size else ""
    )


def volume_name(patient_id: str, fp: str, legacy: bool = False) -> str:
    """`<stem>.<fingerprint>.npy` (brats.io.names); `legacy`: the name caches prepared before the
    one naming policy gave every id a hashed stem, still read and reused."""
    return f"{hashed_stem(patient_id) if legacy else file_stem(patient_id)}.{fp}.npy"


def volume_owner(name: str) -> tuple[str, str] | None:
    """(stem, fingerprint) of a volume file's name, or None when it is not one."""
    if not name.endswith(".npy"):
        return None
    stem, _, fp = name[: -len(".npy")].rpartition(".")
    return (stem, fp) if len(fp) == 16 and all(ch in _HEX for ch in fp) else None


def is_volume_file(name: object) -> bool:
    """`volumes/<name>`: a plain file name inside the volumes folder, nothing that leads out."""
    if not isinstance(name, str) or not name.startswith(f"{VOLUMES}/") or not name.endswith(".npy"):
        return False
    base = name[len(VOLUMES) + 1 :]
    return bool(base) and not base.startswith(".") and "/" not in base and "\\" not in base


def index_problem(index: object) -> str:
    """What is wrong with the structure of a parsed index.json ("" when nothing)."""
    if not isinstance(index, dict):
        return "not a JSON object"
    pre = index.get("preprocess")
    if not isinstance(pre, dict):
        return "no preprocess settings"
    size, mods = pre.get("size"), pre.get("modalities")
    if type(size) is not int or size < 1:
        return f"preprocess size {size!r} is not a positive integer"
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        return f"preprocess modalities {mods!r} are not a list of names"
    if not isinstance(index.get("source", ""), str) or not isinstance(index.get("skipped", []), list):
        return "source or skipped of the wrong type"
    patients = index.get("patients")
    if not isinstance(patients, list):
        return "no list of patients"
    seen = set()
    for n, e in enumerate(patients):
        if not isinstance(e, dict):
            return f"patient entry {n} is not an object"
        pid = e.get("patient_id")
        if not isinstance(pid, str) or not pid:
            return f"patient entry {n} has no patient_id"
        if pid in seen:
            return f"patient {pid} is listed twice"
        seen.add(pid)
        if type(e.get("label")) is not int or e["label"] not in (0, 1):
            return f"patient {pid} has label {e.get('label')!r}, not 0 or 1"
        if not is_volume_file(e.get("file")):
            return f"patient {pid} has file {e.get('file')!r}, not {VOLUMES}/<name>.npy"
        if "profile" in e and not isinstance(e["profile"], dict):
            return f"patient {pid} has a profile that is not an object"
        crc = e.get("crc32")
        if crc is not None and (type(crc) is not int or not 0 <= crc < 2**32):
            return f"patient {pid} has checksum {crc!r}, not a CRC-32"
    return ""


def read_index(path: Path) -> dict:
    """A parsed, structurally checked index.json; raises Broken saying why not."""
    try:
        index = json.loads(path.read_bytes())
    except OSError as e:
        raise Broken(f"cannot be read ({e.strerror or type(e).__name__})") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise Broken(f"is not valid JSON ({str(e).splitlines()[0]})") from e
    problem = index_problem(index)
    if problem:
        raise Broken(f"is damaged ({problem})")
    return index
