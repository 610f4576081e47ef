"""A fold's cached volumes held resident: one float16 tensor, batches by index gather.

The DataLoader path (`--cache-device off`) reads memory-mapped float16 files in worker
processes, converts them to float32, passes them through shared and pinned memory and copies
them to the GPU: on an H100 it feeds ResNet-50 4-6x slower than the model trains. Holding the
fold (4x128^3 float16 = 16.8 MB a patient, 4.8 GB for all of BraTS 2018) as one tensor on the
GPU turns a batch into an index gather and a cast on the device; on a CPU, or when the GPU is
short of memory, the tensor lives in (pinned) host memory.

The loader over it is still a torch DataLoader (no workers) over patient positions with the
same seeded sampler as the DataLoader path, so both paths draw the same batches in the same
order, Accelerate still shards them across processes, and on the CPU both give the same
metrics for the same seed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from brats.cache import CachedCohort, load_volume
from brats.config import CACHE_DEVICES
from brats.errors import BratsError

GPU_SHARE = 0.4  # `auto` puts the cohort on the GPU only if it takes at most this share of free memory


def resolve_cache_device(choice: str, nbytes: int, device: torch.device) -> tuple[str, str]:
    """The resident place for `nbytes` of volumes given `--cache-device`, and why (for the log)."""
    if choice not in CACHE_DEVICES:
        raise BratsError(f"--cache-device {choice!r}: choose one of {', '.join(CACHE_DEVICES)}")
    gib = nbytes / 2**30
    if choice == "cuda" and device.type != "cuda":
        raise BratsError("--cache-device cuda: training is not on a GPU; use auto, cpu or off")
    if choice != "auto":
        return choice, f"--cache-device {choice} ({gib:.2f} GiB)"
    if device.type != "cuda":
        return "cpu", f"{gib:.2f} GiB in host memory (training on {device.type})"
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= GPU_SHARE * free:
        return "cuda", f"{gib:.2f} GiB on the GPU ({free / 2**30:.1f} GiB free)"
    return "cpu", f"{gib:.2f} GiB in pinned host memory: more than {GPU_SHARE:.0%} of the GPU's free memory"


class ResidentVolumes(Dataset):
    """Patients `indices` of a cache as one (N, C, S, S, S) float16 tensor on `device`.

    Items are positions; `collate` turns a list of positions into (x, y): x float32
    (B, C, S, S, S) on `device` when resident there, else float16 on the host (cast after the
    copy to the training device halves the bytes copied); y (B,) int64.
    """

    def __init__(
        self,
        cached: CachedCohort,
        indices: Sequence[int],
        modalities: Sequence[str],
        device: torch.device,
        pin: bool = False,
    ):
        have = tuple(cached.preprocess["modalities"])
        missing = [m for m in modalities if m not in have]
        if missing:
            raise BratsError(f"{cached.root}: cache has channels {have}, not {missing}: prepare it again")
        channels = [have.index(m) for m in modalities]
        first = load_volume(cached, indices[0]) if len(indices) else None
        shape = (len(indices), len(channels), *first.shape[1:]) if first is not None else (0,)
        host = torch.empty(shape, dtype=torch.float16, pin_memory=pin and device.type == "cpu")
        for row, i in enumerate(indices):  # one patient at a time: peak memory is the tensor itself
            vol = first if row == 0 else load_volume(cached, i)
            host[row] = torch.from_numpy(np.ascontiguousarray(vol[channels]))
        self.volumes = host.to(device) if device.type != "cpu" else host  # (N, C, S, S, S) float16
        self.labels = torch.as_tensor(cached.labels[list(indices)], dtype=torch.int64)
        self.on_device = device.type != "cpu"
        self.pin = host.is_pinned()

    def __len__(self) -> int:
        return len(self.labels)

    def part(self, start: int, stop: int) -> ResidentVolumes:
        """Patients [start, stop) as their own dataset: views of the same tensor, no copy."""
        view = copy.copy(self)
        view.volumes, view.labels = self.volumes[start:stop], self.labels[start:stop]
        return view

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(positions, dtype=torch.int64)
        y = self.labels[idx]
        if self.on_device:
            return self.volumes.index_select(0, idx.to(self.volumes.device)).float(), y.to(
                self.volumes.device
            )
        x = self.volumes.index_select(0, idx)
        return (x, y) if self.pin else (x.float(), y)  # pinned: copied as float16, cast on the GPU


def resident_loader(
    ds: ResidentVolumes, batch_size: int, sampler: Sampler[int] | None = None, drop_last: bool = False
) -> DataLoader:
    """A worker-free loader over `ds`: the sampler's positions, gathered by `ds.collate`."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=0,
        collate_fn=ds.collate,
        pin_memory=ds.pin,
        drop_last=drop_last,
    )


def volume_bytes(cached: CachedCohort, n: int, channels: int) -> int:
    """Bytes of `n` resident float16 volumes with `channels` channels of this cache."""
    if not len(cached):
        return 0
    side = cached.volumes[0].shape[1:]
    return int(n * channels * np.prod(side) * 2)
