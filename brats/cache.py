"""Preprocess each patient once: fingerprinted, verified, atomic, parallel; memory-mapped for training.

Layout of a cache folder:
    index.json                      preprocessing config + one entry per usable patient
    volumes/<stem>.<fp>.npy         float16 (C, S, S, S), one file per patient

The stem is the patient id made safe for a file name plus a hash of the exact id
(`volume_stem`). The fingerprint of a patient is a hash of the preprocessing contract (which
includes the preprocessing version) and the size and mtime of each source file, and it is part
of the file name: a file exists only once it is complete (temp file + fsync + rename), so a run
killed at any point leaves no partial entry, and the next run redoes only what is missing or
changed.

A file that exists can still be damaged afterwards (a disk, a copy, a person): index.json holds
the CRC-32 of each volume's data, taken when it was written. Prepare checks every volume it
reuses against it and redoes the broken ones; training checks each volume as it reads it
(`load_volume`), so a broken file stops a run with one line naming the patient, never with a
traceback, a crash or NaN losses.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brats.atomic import check_output_dir, pid_alive, remove_stale_temps, write_atomic, write_json_atomic
from brats.cohort import Case, check_trainable
from brats.errors import BratsError, CaseError
from brats.preprocess import ZLIB_MODULE, PreprocessConfig, preprocess_case

log = logging.getLogger(__name__)

INDEX = "index.json"
VOLUMES = "volumes"
DTYPE = np.dtype(np.float16)
STEM_CHARS = 64  # readable part of a volume file name; a hash of the whole id follows it
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_HEX = frozenset("0123456789abcdef")
# Cube sides prepare accepts. ResNet3D (depth 10 and 50, strided) trains on any side from 1 voxel
# in batches of 2 or more (measured); at 16 layers 3-4 already see 1^3 maps, and train.py asks
# for at least 16 too. Above 512, one float16 volume is 1 GiB: no GPU trains a batch of those.
SIZE_MIN, SIZE_MAX = 16, 512
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_S = 0.5  # how often a worker without PR_SET_PDEATHSIG checks that prepare lives


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


class _Broken(Exception):
    """Why a cached file cannot be used (a phrase: "is truncated ...")."""


def checksum(data: memoryview | bytes) -> int:
    """CRC-32 of `data` (ISA-L's is ~4x faster than zlib's: 4 ms for a 4x128^3 float16 volume)."""
    return ZLIB_MODULE.crc32(data) & 0xFFFFFFFF


def all_finite(volume: np.ndarray) -> bool:
    """No NaN or infinity in a float16 array: exponent bits all set means not finite (3x faster
    than np.isfinite on float16)."""
    return not bool(((volume.view(np.uint16) & 0x7C00) == 0x7C00).any())


def _volume_header(path: Path, shape: tuple[int, ...]) -> int:
    """Check a .npy file's header and size against a float16 `shape` without reading its data;
    returns where the data starts."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _Broken("is empty")
            try:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                read = read or np.lib.format.read_array_header_2_0
                got_shape, fortran, dtype = read(f)
            except (ValueError, EOFError, SyntaxError, TypeError) as e:
                raise _Broken("is not a readable .npy file (damaged header)") from e
            offset = f.tell()
    except FileNotFoundError as e:
        raise _Broken("is missing") from e
    except IsADirectoryError as e:
        raise _Broken("is a folder") from e
    except OSError as e:
        raise _Broken(f"cannot be read ({e.strerror or type(e).__name__})") from e
    if dtype != DTYPE or fortran:
        raise _Broken(f"holds {dtype}{' (Fortran order)' if fortran else ''}, not float16")
    if tuple(got_shape) != tuple(shape):
        raise _Broken(f"has shape {tuple(got_shape)}, not {tuple(shape)}")
    want = offset + int(np.prod(shape)) * DTYPE.itemsize
    if size != want:
        raise _Broken(f"is {'truncated' if size < want else 'too long'} ({size} bytes, not {want})")
    return offset


def _read_volume(path: Path, shape: tuple[int, ...], crc32: int | None) -> tuple[np.ndarray, int]:
    """Read a float16 volume whole and check it: header and size, then the checksum taken when
    it was written, or, for a volume written without one, that every value is finite.
    Returns the volume and its checksum."""
    offset = _volume_header(path, shape)
    volume = np.empty(shape, DTYPE)
    buf = memoryview(volume).cast("B")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            n = f.readinto(buf)
    except OSError as e:
        raise _Broken(f"cannot be read ({e.strerror or type(e).__name__})") from e
    if n != len(buf):
        raise _Broken(f"is truncated ({offset + n} bytes, not {offset + len(buf)})")
    crc = checksum(buf)
    if crc32 is not None and crc != crc32:
        raise _Broken("does not match the checksum taken when it was written (damaged data)")
    if crc32 is None and not all_finite(volume):
        raise _Broken("holds NaN or infinite values")
    return volume, crc


def rerun_hint(root: Path, source: str = "", size: int | None = None) -> str:
    """The command that rebuilds the cache at `root`."""
    cohort = shlex.quote(source) if source else "COHORT"
    return f"rerun python -m brats.prepare {cohort} --out {shlex.quote(str(root))}" + (
        f" --size {size}" if size else ""
    )


def check_size(size: int) -> None:
    if not SIZE_MIN <= size <= SIZE_MAX:
        raise BratsError(
            f"--size {size}: choose a cube side from {SIZE_MIN} to {SIZE_MAX} voxels (seed 6.2: 128)"
        )


def check_cache_dir(out: str | Path) -> Path:
    """Check, before any work, that a cache can be written at `out` (created if needed)."""
    out = check_output_dir(out, "cache folder")
    check_output_dir(out / VOLUMES, "cache folder")
    if (out / INDEX).is_dir():
        raise BratsError(f"cache folder {out}: {out / INDEX} is a folder: remove it or choose another --out")
    return out


def fingerprint(case: Case, cfg: PreprocessConfig) -> str:
    """16 hex digits that change when the contract or any source file (size, mtime) changes."""
    files = []
    for p in case.paths:
        st = os.stat(p)
        files.append([Path(p).name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"preprocess": cfg.to_contract(), "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def volume_stem(patient_id: str) -> str:
    """A file name stem for a patient id that is safe whatever the id holds.

    Ids come from folder names and CSV cells: they may hold `/`, `..`, glob metacharacters or
    dots (`X` and `X.bak`). The stem keeps the id's harmless characters (readable listings)
    and adds a hash of the exact id, so two ids never share a stem; it holds no dot, so the
    owner of a volume file is the part of its name before the first dot.
    """
    safe = _UNSAFE.sub("_", patient_id)[:STEM_CHARS] or "_"
    return f"{safe}-{hashlib.sha256(patient_id.encode()).hexdigest()[:8]}"


def volume_name(patient_id: str, fp: str) -> str:
    return f"{volume_stem(patient_id)}.{fp}.npy"


def _old_volumes(vol_dir: Path, patient_id: str, keep: str) -> list[Path]:
    """The volume files of this patient other than `keep`, found by exact name, never by a
    pattern built from the id. Files named `<id>.<fp>.npy` by earlier versions count too."""
    stem = volume_stem(patient_id)
    old = []
    for f in vol_dir.iterdir():
        name = f.name
        if name == keep or not name.endswith(".npy"):
            continue
        owner, _, fp = name[: -len(".npy")].rpartition(".")
        if owner in (stem, patient_id) and len(fp) == 16 and all(ch in _HEX for ch in fp):
            old.append(f)
    return old


def _arm_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # orphaned: the run was killed, nobody will collect this patient


def _die_with_parent(main_pid: int) -> None:
    """Make a pool worker end when prepare ends, even by kill -9: a worker blocked on the task
    queue never sees the parent go (it holds the queue's other end itself) and would live on."""
    parent = os.getppid()  # `main_pid` itself, or the fork server the pool starts workers from
    armed = _arm_parent_death_signal()
    if os.getppid() != parent or (parent != main_pid and not pid_alive(main_pid)):
        os._exit(1)  # the parent died before the signal was armed
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _init_worker(main_pid: int) -> None:
    _die_with_parent(main_pid)
    # One process per core: each SimpleITK reader runs single-threaded.
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


def _prepare_one(case: Case, cfg: PreprocessConfig, target: Path) -> tuple[str | None, int | None]:
    """Preprocess and write one patient; returns (error line, None) instead of raising, or
    (None, checksum of the volume's data)."""
    try:
        volume = preprocess_case(case, cfg).astype(DTYPE)
    except CaseError as e:
        return str(e), None
    except Exception as e:  # an unexpected failure of one patient must not stop the others
        return f"{case.patient_id}: preprocessing failed ({type(e).__name__}: {e})", None
    if not all_finite(volume):  # never cache what would turn the losses into NaN
        return f"{case.patient_id}: preprocessing gave NaN or infinite values (check its images)", None
    write_atomic(target, lambda f: np.save(f, volume))
    for old in _old_volumes(target.parent, case.patient_id, keep=target.name):
        old.unlink(missing_ok=True)
    return None, checksum(memoryview(volume).cast("B"))


@dataclass
class PrepareResult:
    written: list[str]
    reused: list[str]
    failed: list[str]  # one line per patient: "<patient>: <reason>"
    index_written: bool
    repaired: list[str] = field(default_factory=list)  # "<patient>: cached volume ... was broken ..."
    index_problem: str = ""  # why the previous index.json could not be used, if it could not


def _volume_file(name: object) -> bool:
    """`volumes/<name>`: a plain file name inside the volumes folder, nothing that leads out."""
    if not isinstance(name, str) or not name.startswith(f"{VOLUMES}/") or not name.endswith(".npy"):
        return False
    base = name[len(VOLUMES) + 1 :]
    return bool(base) and not base.startswith(".") and "/" not in base and "\\" not in base


def _index_problem(index: object) -> str:
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
        if not _volume_file(e.get("file")):
            return f"patient {pid} has file {e.get('file')!r}, not {VOLUMES}/<name>.npy"
        crc = e.get("crc32")
        if crc is not None and (type(crc) is not int or not 0 <= crc < 2**32):
            return f"patient {pid} has checksum {crc!r}, not a CRC-32"
    return ""


def _read_index(path: Path) -> dict:
    """A parsed, structurally checked index.json; raises _Broken saying why not."""
    try:
        index = json.loads(path.read_bytes())
    except OSError as e:
        raise _Broken(f"cannot be read ({e.strerror or type(e).__name__})") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise _Broken(f"is not valid JSON ({str(e).splitlines()[0]})") from e
    problem = _index_problem(index)
    if problem:
        raise _Broken(f"is damaged ({problem})")
    return index


def prepare(
    cases: list[Case],
    out: str | Path,
    cfg: PreprocessConfig = PreprocessConfig(),
    workers: int | None = None,
    skip_bad: bool = False,
    known_failures: Iterable[CaseError] = (),
    source: str = "",
    progress: bool = True,
) -> PrepareResult:
    """Bring the cache at `out` up to date with `cases`.

    Every patient is attempted; failures (with `known_failures` from cohort discovery) are
    collected. A volume already there is reused only when it passes its checks (header, size,
    the checksum in the index); a broken one is redone and listed in `repaired`. The index is
    (re)written only when every patient succeeded or `skip_bad` is set, and only when its
    content changed, so an unchanged cohort writes nothing; an unreadable index is rebuilt.
    """
    check_size(cfg.size)
    out = check_cache_dir(out)
    vol_dir = out / VOLUMES
    remove_stale_temps(vol_dir)  # left by a killed run
    remove_stale_temps(out)

    old_index, index_problem = None, ""
    if (out / INDEX).exists():
        try:
            old_index = _read_index(out / INDEX)
        except _Broken as e:
            index_problem = f"{out / INDEX} {e}"
    known_crc = {(e["patient_id"], e["file"]): e.get("crc32") for e in (old_index or {}).get("patients", [])}

    entries, jobs, reused, repaired = _plan(cases, cfg, vol_dir, known_crc)
    failed = [str(e) for e in known_failures]
    written = _run_jobs(jobs, cfg, workers, progress, entries, failed)

    failed_ids = {line.split(":", 1)[0] for line in failed}
    index_written = False
    if not failed or skip_bad:
        index = {
            "preprocess": cfg.to_contract(),
            "source": source,
            "patients": [e for pid, e in entries.items() if pid not in failed_ids],
            "skipped": sorted(failed),
        }
        if old_index != index:
            write_json_atomic(out / INDEX, index)
            index_written = True
    return PrepareResult(
        sorted(written), sorted(reused), sorted(failed), index_written, repaired, index_problem
    )


def _plan(
    cases: list[Case], cfg: PreprocessConfig, vol_dir: Path, known_crc: dict
) -> tuple[dict[str, dict], list[tuple[Case, Path]], list[str], list[str]]:
    """Index entries of every case, and which volumes must be (re)made: missing or broken ones."""
    shape = (len(cfg.modalities), cfg.size, cfg.size, cfg.size)
    entries: dict[str, dict] = {}
    jobs, reused, repaired = [], [], []
    for case in cases:
        fp = fingerprint(case, cfg)
        target = vol_dir / volume_name(case.patient_id, fp)
        entry = {
            "patient_id": case.patient_id,
            "label": case.label,
            "file": f"{VOLUMES}/{target.name}",
            "fingerprint": fp,
        }
        entries[case.patient_id] = entry
        if not target.exists():
            jobs.append((case, target))
            continue
        try:
            # without a recorded checksum (the index of a killed run was never written) the
            # file is complete by construction: adopt it once its values are finite
            _, entry["crc32"] = _read_volume(target, shape, known_crc.get((case.patient_id, entry["file"])))
            reused.append(case.patient_id)
        except _Broken as e:
            repaired.append(f"{case.patient_id}: cached volume {target} {e}; preprocessed again")
            jobs.append((case, target))
    return entries, jobs, reused, repaired


def _run_jobs(
    jobs: list[tuple[Case, Path]],
    cfg: PreprocessConfig,
    workers: int | None,
    progress: bool,
    entries: dict[str, dict],
    failed: list[str],
) -> list[str]:
    """Preprocess `jobs` (in worker processes when there are several); records checksums in
    `entries` and error lines in `failed`; returns the patients written."""
    written: list[str] = []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = tqdm(total=len(jobs), desc="prepare", unit="patient", disable=not progress or not jobs)

    def record(case: Case, err: str | None, crc: int | None) -> None:
        if err:
            failed.append(err)
        else:
            written.append(case.patient_id)
            entries[case.patient_id]["crc32"] = crc
        bar.update()

    if workers == 1:
        for case, target in jobs:
            record(case, *_prepare_one(case, cfg, target))
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_prepare_one, case, cfg, target): case for case, target in jobs}
            try:
                for fut in as_completed(futures):
                    record(futures[fut], *fut.result())
            except BaseException:
                # a write error (full disk) or Ctrl-C: the patients under way finish or fail
                # atomically, the queued ones never start
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    bar.close()
    return written


@dataclass(frozen=True)
class CachedCohort:
    """A prepared cohort: ids, labels and memory-mapped float16 volumes (C, S, S, S).

    Read a volume for training with `load_volume`, which checks it; `volumes` are the raw
    memory maps (their headers and sizes were checked when the cache was opened).
    """

    root: Path
    patient_ids: list[str]
    labels: np.ndarray  # (N,) int64, 1 = HGG
    volumes: list[np.ndarray]  # memory-mapped, read-only
    preprocess: dict
    files: list[Path] = field(default_factory=list)  # one .npy per patient
    checksums: list[int | None] = field(default_factory=list)  # CRC-32 of each volume's data
    source: str = ""  # the cohort the cache was prepared from

    def __len__(self) -> int:
        return len(self.patient_ids)

    def indices(self, patients: list[str]) -> list[int]:
        """Positions of `patients` (ids) in this cache."""
        position = {p: i for i, p in enumerate(self.patient_ids)}
        return [position[p] for p in patients]

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, S, S, S) of every volume."""
        s = self.preprocess["size"]
        return (len(self.preprocess["modalities"]), s, s, s)


def load_volume(cached: CachedCohort, i: int) -> np.ndarray:
    """Patient `i`'s float16 (C, S, S, S) volume, read whole and checked (size, checksum or
    finite values); raises BrokenVolumeError, one line naming the patient and the file."""
    try:
        volume, _ = _read_volume(cached.files[i], cached.shape, cached.checksums[i])
    except _Broken as e:
        raise BrokenVolumeError(
            f"{cached.patient_ids[i]}: cached volume {cached.files[i]} {e}: "
            f"{rerun_hint(cached.root, cached.source, cached.preprocess['size'])}"
        ) from None
    return volume


def verify_volumes(cached: CachedCohort, indices: Iterable[int]) -> None:
    """Read each of these volumes whole and check it (`load_volume`) before training on any:
    ~13 ms a 4x128^3 volume on 2 slow cores, once per run, against ~25 ms more per sample and
    epoch for checking every read."""
    for i in indices:
        load_volume(cached, i)


def mapped_volume(cached: CachedCohort, i: int) -> np.ndarray:
    """Patient `i`'s memory-mapped float16 volume (checked by `verify_volumes` beforehand),
    after a check that its file still has its full size: reading a memory map past the end of
    a file cut short kills the process with SIGBUS."""
    vol = cached.volumes[i]
    want = getattr(vol, "offset", 0) + vol.nbytes
    try:
        size = cached.files[i].stat().st_size if cached.files else want
    except OSError:
        size = -1
    if size != want:
        raise BrokenVolumeError(
            f"{cached.patient_ids[i]}: cached volume {cached.files[i]} changed during training "
            f"({size} bytes, not {want}): {rerun_hint(cached.root, cached.source, cached.preprocess['size'])}"
        )
    return vol


def open_data(data: str | Path, size: int) -> CachedCohort:
    """The cache a run trains on: `data` itself, or the raw cohort `data` prepared first."""
    return open_cache(ensure_prepared(data, size))


def is_cache(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def open_cache(path: str | Path) -> CachedCohort:
    """Open a prepared cache: checks the index, and the header and size of every volume."""
    root = Path(path)
    if not is_cache(root):
        raise BratsError(f"{root} is not a prepared cache (no {INDEX}): {rerun_hint(root)}")
    try:
        index = _read_index(root / INDEX)
    except _Broken as e:
        raise BrokenVolumeError(f"cache index {root / INDEX} {e}: {rerun_hint(root)}") from None
    patients, source, size = index["patients"], index.get("source", ""), index["preprocess"]["size"]
    shape = (len(index["preprocess"]["modalities"]), size, size, size)
    files = [root / e["file"] for e in patients]
    volumes, broken = [], []
    for e, f in zip(patients, files):
        try:
            offset = _volume_header(f, shape)
            volumes.append(np.memmap(f, DTYPE, mode="r", offset=offset, shape=shape))
        except _Broken as err:
            broken.append(f"{e['patient_id']}: cached volume {f} {err}")
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise BrokenVolumeError(f"{broken[0]}{more}: {rerun_hint(root, source, size)}")
    ids = [e["patient_id"] for e in patients]
    labels = np.array([e["label"] for e in patients], dtype=np.int64)
    checksums = [e.get("crc32") for e in patients]
    return CachedCohort(root, ids, labels, volumes, index["preprocess"], files, checksums, source)


def ensure_prepared(data: str | Path, size: int) -> Path:
    """`data` is a prepared cache (returned as is) or a raw cohort, prepared into the folder
    `<data>_cache<size>` beside it (reused when up to date)."""
    from brats.cohort import find_cases, summarize

    data = Path(data)
    if is_cache(data):
        return data
    cohort = find_cases(data)
    check_trainable(cohort.cases, data)
    out = data.parent / f"{data.name}_cache{size}"
    log.info(f"{data}: {summarize([c.label for c in cohort.cases])}; preparing into {out}")
    result = prepare(
        cohort.cases,
        out,
        PreprocessConfig(size=size),
        known_failures=cohort.problems,
        source=str(data),
    )
    if result.index_problem:
        log.warning(f"{result.index_problem}: rebuilt")
    for line in result.repaired:
        log.warning(line)
    if result.failed:
        lines = "\n  ".join(result.failed)
        raise BratsError(
            f"{len(result.failed)} patient(s) could not be prepared:\n  {lines}\n"
            "fix them, or run python -m brats.prepare --skip-bad"
        )
    return out
