"""What makes training fast on a GPU, decided in one place: cuDNN flags, memory format, compile,
and how the recipe's effective batch is kept across processes.

What each buys on a GPU is in bench/RESULTS.md ("GPU"), where bench/gpu.sh records it.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from brats.errors import BratsError

log = logging.getLogger(__name__)


def configure_backends(device: torch.device, deterministic: bool) -> str:
    """cuDNN autotuning on a GPU, unless `deterministic` asks for reproducible kernels; returns a
    line for the log. Deterministic means torch's deterministic algorithms everywhere (cuDNN's,
    cuBLAS with a fixed workspace), warning where an operation has none (MaxPool3d's and the
    adaptive pooling's backward on CUDA accumulate with atomic adds: README, "On GPUs")."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # off again for the next run
    if device.type != "cuda":
        return "CPU: deterministic kernels, exact resume"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        return (
            "deterministic algorithms (--deterministic): slower, repeatable on the same GPU and software "
            "except where torch warns that an operation has no deterministic kernel"
        )
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "cuDNN benchmark on (fastest kernels; results may differ in the last bits between runs)"


def memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """channels_last_3d on a GPU (faster cuDNN convolutions there); contiguous on the CPU."""
    return torch.channels_last_3d if channels_last and device.type == "cuda" else torch.contiguous_format


def maybe_compile(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """torch.compile the (prepared) model when asked; the compiled wrapper shares the plain
    module's parameters, so saved and exported weights are always the plain module's."""
    if not enabled:
        return model
    log.info(f"torch.compile ({backend}): the first training step compiles the model (tens of seconds)")
    return torch.compile(model, backend=backend)


class FirstStepTimer:
    """Logs how long the first step took (the one-off cost of compile and cuDNN autotuning)."""

    def __init__(self, what: str):
        self.what, self.t0, self.done = what, time.perf_counter(), False

    def step(self) -> None:
        if not self.done:
            self.done = True
            log.info(f"{self.what}: first step took {time.perf_counter() - self.t0:.1f} s (one-off)")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host-device sync: through pinned memory (torch's
    caching host allocator reuses a block only once its copy is done), non-blocking. A copy
    from ordinary (pageable) memory waits for the device's stream to drain first. On the CPU,
    the tensor itself."""
    if device.type != "cuda" or t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Lay each optimizer state tensor (Adam's moments) out like its parameter. A loaded state
    keeps the strides it was saved with: resumed after a memory-format change (a run started on
    the CPU, or without channels_last, resumed on a GPU with it), the fused CUDA kernel refuses
    mismatched layouts and the fused CPU kernel ignores strides and updates wrong values."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


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
