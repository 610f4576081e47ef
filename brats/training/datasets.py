"""What training reads: torch datasets and samplers over a prepared cache.

Two paths draw the same batches from the same seeded sampler, so on the CPU they give the same
metrics for the same seed:
- `ResidentVolumes` (the default, `--cache-device auto`): the fold held as one float16 tensor, on
  the GPU when it fits, else in host memory; a batch is an index gather and a cast on the device.
  On a GPU the DataLoader path cannot feed ResNet-50 as fast as it trains (bench/RESULTS.md,
  "GPU"); holding the fold (16.8 MB a patient at 4x128^3, 4.8 GB for BraTS 2018) removes the
  copy through workers, shared and pinned memory.
- `CachedVolumes` (`--cache-device off`): memory-mapped float16 files read in DataLoader workers.
The resident loader is still a torch DataLoader (no workers) over patient positions, so
Accelerate still shards it across processes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from brats.data.cache_reader import CachedCohort, channel_indices, load_volume, mapped_volume, verify_volumes
from brats.errors import BratsError
from brats.training.config import CACHE_DEVICES
from brats.training.speed import to_device


class CachedVolumes(Dataset):
    """Patients `indices` of a cache -> (float32 (C, S, S, S), label) with the chosen channels."""

    def __init__(self, cached: CachedCohort, indices: list[int], modalities: tuple[str, ...]):
        self.cached, self.indices = cached, list(indices)
        self.channels = channel_indices(cached, modalities)
        self.all_channels = self.channels == list(range(len(cached.preprocess["modalities"])))
        verify_volumes(cached, self.indices)  # a broken file stops the run here, in one line

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        vol = mapped_volume(self.cached, self.indices[i])  # memory-mapped float16 (C, S, S, S)
        vol = vol if self.all_channels else vol[self.channels]
        return torch.from_numpy(np.asarray(vol, dtype=np.float32)), int(self.cached.labels[self.indices[i]])

    @property
    def labels(self) -> np.ndarray:
        return self.cached.labels[self.indices]


class EpochPermutation(Sampler[int]):
    """A random permutation per epoch from our own generator (reseeded per epoch for exact resume)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def make_sampler(kind: str, labels: np.ndarray, generator: torch.Generator) -> Sampler[int]:
    """inverse_freq: WeightedRandomSampler with weight 1/count(class) (RECIPE.md 6.1), one epoch = N draws."""
    if kind == "inverse_freq":
        counts = np.bincount(labels, minlength=2)
        weights = 1.0 / counts[labels]
        return WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double), len(labels), replacement=True, generator=generator
        )
    return EpochPermutation(len(labels), generator)


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
    (B, C, S, S, S) and y (B,) int64 on `device` when resident there, the index copied without
    a host-device sync. Held on the host for a GPU (`pin`), a batch is gathered straight into
    pinned memory as float16 (half the bytes to copy; cast on the GPU), which the prepared
    loader copies without waiting; the store itself is not pinned: pinning a whole fold would
    lock that much memory in every process and buy nothing, since a gather returns new memory.
    """

    def __init__(
        self,
        cached: CachedCohort,
        indices: Sequence[int],
        modalities: Sequence[str],
        device: torch.device,
        pin: bool = False,
    ):
        channels = channel_indices(cached, modalities)
        first = load_volume(cached, indices[0]) if len(indices) else None
        shape = (len(indices), len(channels), *first.shape[1:]) if first is not None else (0,)
        host = torch.empty(shape, dtype=torch.float16)
        for row, i in enumerate(indices):  # one patient at a time: peak memory is the tensor itself
            vol = first if row == 0 else load_volume(cached, i)
            host[row] = torch.from_numpy(np.ascontiguousarray(vol[channels]))
        self.volumes = host.to(device) if device.type != "cpu" else host  # (N, C, S, S, S) float16
        self.labels = torch.as_tensor(cached.labels[list(indices)], dtype=torch.int64).to(device)
        self.pin = pin and device.type == "cpu"  # a GPU trains from this host store

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
        idx = to_device(torch.as_tensor(positions, dtype=torch.int64), self.volumes.device)
        y = self.labels.index_select(0, idx)
        if not self.pin:
            return self.volumes.index_select(0, idx).float(), y
        x = torch.empty((len(idx), *self.volumes.shape[1:]), dtype=self.volumes.dtype, pin_memory=True)
        return torch.index_select(self.volumes, 0, idx, out=x), y.pin_memory()


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
        pin_memory=False,  # collate pins what a GPU will copy
        drop_last=drop_last,
    )


def volume_bytes(cached: CachedCohort, n: int, channels: int) -> int:
    """Bytes of `n` resident float16 volumes with `channels` channels of this cache."""
    if not len(cached):
        return 0
    side = cached.volumes[0].shape[1:]
    return int(n * channels * np.prod(side) * 2)
