"""Fast-path decisions that hold on any machine."""

from __future__ import annotations

import pytest
import torch

from brats.errors import BratsError
from brats.training.speed import configure_backends, memory_format, split_effective_batch


@pytest.mark.parametrize(
    "effective, batch, processes, expected",
    [
        (8, 4, 1, (4, 2)),  # the recipe on one GPU
        (8, 4, 2, (4, 1)),
        (8, 4, 4, (2, 1)),  # the per-process batch shrinks only when it must
        (8, 4, 8, (1, 1)),
        (12, 6, 2, (6, 1)),
        (8, 2, 1, (2, 4)),
    ],
)
def test_effective_batch_is_kept_across_processes(effective, batch, processes, expected):
    b, a = split_effective_batch(effective, batch, processes)
    assert (b, a) == expected and b * a * processes == effective


def test_effective_batch_that_cannot_be_split_says_so():
    with pytest.raises(BratsError, match="multiple of 3"):
        split_effective_batch(8, 4, 3)


def test_cpu_keeps_the_contiguous_format_and_says_resume_is_exact():
    cpu = torch.device("cpu")
    assert memory_format(cpu, True) == torch.contiguous_format
    assert "exact resume" in configure_backends(cpu, deterministic=False)
