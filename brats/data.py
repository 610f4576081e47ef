"""Torch datasets and samplers over a prepared cache."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from brats.cache import CachedCohort, mapped_volume, verify_volumes
from brats.errors import BratsError


class CachedVolumes(Dataset):
    """Patients `indices` of a cache -> (float32 (C, S, S, S), label) with the chosen channels."""

    def __init__(self, cached: CachedCohort, indices: list[int], modalities: tuple[str, ...]):
        have = tuple(cached.preprocess["modalities"])
        missing = [m for m in modalities if m not in have]
        if missing:
            raise BratsError(f"{cached.root}: cache has channels {have}, not {missing}: prepare it again")
        self.cached, self.indices = cached, list(indices)
        self.channels = [have.index(m) for m in modalities]
        self.all_channels = self.channels == list(range(len(have)))
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
    """inverse_freq: WeightedRandomSampler with weight 1/count(class) (seed 6.1), one epoch = N draws."""
    if kind == "inverse_freq":
        counts = np.bincount(labels, minlength=2)
        weights = 1.0 / counts[labels]
        return WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double), len(labels), replacement=True, generator=generator
        )
    return EpochPermutation(len(labels), generator)
