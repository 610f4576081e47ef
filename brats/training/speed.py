"""What makes training fast on a GPU, decided in one place: cuDNN flags, memory format, compile,
and how the recipe's effective batch is kept across processes.

What each buys on a GPU is in bench/RESULTS.md ("GPU"), where bench/gpu.sh records it.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from brats.errors import BratsError

log = logging.getLogger(__name__)


def configure_backends(device: torch.device, deterministic: bool) -> str:
    """cuDNN autotuning on a GPU, unless `deterministic` asks for reproducible kernels; returns a
    line for the log."""
    if device.type != "cuda":
        return "CPU: deterministic kernels, exact resume"
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        return "cuDNN deterministic (--deterministic): slower, repeatable on the same GPU and software"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "cuDNN benchmark on (fastest kernels; results may differ in the last bits between runs)"


def memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """channels_last_3d on a GPU (faster cuDNN convolutions there); contiguous on the CPU."""
    return torch.channels_last_3d if channels_last and device.type == "cuda" else torch.contiguous_format


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile the model when asked; the compiled wrapper shares the plain module's
    parameters, so saved and exported weights are always the plain module's."""
    if not enabled:
        return model
    log.info("torch.compile: the first training step compiles the model (tens of seconds on ResNet-50)")
    return torch.compile(model)


class FirstStepTimer:
    """Logs how long the first step took (the one-off cost of compile and cuDNN autotuning)."""

    def __init__(self, what: str):
        self.what, self.t0, self.done = what, time.perf_counter(), False

    def step(self) -> None:
        if not self.done:
            self.done = True
            log.info(f"{self.what}: first step took {time.perf_counter() - self.t0:.1f} s (one-off)")


def split_effective_batch(effective: int, batch: int, processes: int) -> tuple[int, int]:
    """(per-process batch, accumulation) so that batch x accumulation x processes == `effective`,
    keeping the per-process batch as large as allowed (BatchNorm statistics) up to `batch`."""
    for b in range(min(batch, effective), 0, -1):
        if effective % (b * processes) == 0:
            return b, effective // (b * processes)
    raise BratsError(
        f"--effective-batch {effective} cannot be split over {processes} processes "
        f"(it must be a multiple of the process count): choose a multiple of {processes}"
    )
