"""Read a prepared cache for training and evaluation: memory-mapped volumes, each checked.

Training checks each volume as it reads it (`load_volume`), so a broken file stops a run with
one line naming the patient, never with a traceback, a crash or NaN losses. `open_data` opens
`--data`: a cache, or a raw cohort prepared first.

No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brats.data.cache_builder import prepare
from brats.data.cache_format import (
    DTYPE,
    INDEX,
    Broken,
    BrokenVolumeError,
    read_index,
    read_volume,
    rerun_hint,
    volume_header,
)
from brats.data.cohort import UNKNOWN, check_trainable, collection_of, find_cases, summarize
from brats.data.preprocess import PreprocessConfig
from brats.errors import BratsError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
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
    profiles: list[dict | None] = field(default_factory=list)  # each patient's ScanProfile, as JSON
    collections: list[str] = field(default_factory=list)  # each patient's data collection, or "unknown"
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


def channel_indices(cached: CachedCohort, modalities: Sequence[str]) -> list[int]:
    """Positions of `modalities` among the cache's channels; refused when the cache lacks one."""
    have = tuple(cached.preprocess["modalities"])
    missing = [m for m in modalities if m not in have]
    if missing:
        raise BratsError(f"{cached.root}: cache has channels {have}, not {missing}: prepare it again")
    return [have.index(m) for m in modalities]


def load_volume(cached: CachedCohort, i: int) -> np.ndarray:
    """Patient `i`'s float16 (C, S, S, S) volume, read whole and checked (size, checksum or
    finite values); raises BrokenVolumeError, one line naming the patient and the file."""
    try:
        volume, _ = read_volume(cached.files[i], cached.shape, cached.checksums[i])
    except Broken as e:
        raise BrokenVolumeError(
            f"{cached.patient_ids[i]}: cached volume {cached.files[i]} {e}: "
            f"{rerun_hint(cached.root, cached.source, cached.preprocess['size'])}"
        ) from None
    return volume


def verify_volumes(cached: CachedCohort, indices: Iterable[int]) -> None:
    """Read each of these volumes whole and check it (`load_volume`) before training on any: once
    per run, rather than on every read of every epoch (bench/RESULTS.md, "Figures the code
    relies on")."""
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
        index = read_index(root / INDEX)
    except Broken as e:
        raise BrokenVolumeError(f"cache index {root / INDEX} {e}: {rerun_hint(root)}") from None
    patients, source, size = index["patients"], index.get("source", ""), index["preprocess"]["size"]
    shape = (len(index["preprocess"]["modalities"]), size, size, size)
    files = [root / e["file"] for e in patients]
    volumes, broken = [], []
    for e, f in zip(patients, files):
        try:
            offset = volume_header(f, shape)
            volumes.append(np.memmap(f, DTYPE, mode="r", offset=offset, shape=shape))
        except Broken as err:
            broken.append(f"{e['patient_id']}: cached volume {f} {err}")
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise BrokenVolumeError(f"{broken[0]}{more}: {rerun_hint(root, source, size)}")
    ids = [e["patient_id"] for e in patients]
    labels = np.array([e["label"] for e in patients], dtype=np.int64)
    checksums = [e.get("crc32") for e in patients]
    return CachedCohort(
        root=root,
        patient_ids=ids,
        labels=labels,
        volumes=volumes,
        preprocess=index["preprocess"],
        files=files,
        checksums=checksums,
        source=source,
        profiles=[e.get("profile") for e in patients],
        # caches prepared before collections were kept: the BraTS 2018/2019 id still names it
        collections=[str(e.get("collection") or collection_of(e["patient_id"]) or UNKNOWN) for e in patients],
    )


def ensure_prepared(data: str | Path, size: int) -> Path:
    """`data` is a prepared cache (returned as is) or a raw cohort, prepared into the folder
    `<data>_cache<size>` beside it (reused when up to date)."""
    data = Path(data)
    if is_cache(data):
        return data
    cohort = find_cases(data)
    check_trainable(cohort.cases, data, cohort.problems)
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
