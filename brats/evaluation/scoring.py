"""Logits and metrics over a loader: shared by validation during training and by evaluation.

Nothing here trains, so evaluation and export import it without the training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from brats.errors import BratsError
from brats.evaluation.metrics import classification_metrics

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # mixed-precision names -> dtypes


def autocast(device: torch.device, precision: str | None) -> contextlib.AbstractContextManager:
    """The forward-pass context of `precision` ("no", "bf16", "fp16") on `device`: the same
    autocast for the trained and the EMA model, so that what a checkpoint stores is what a
    re-score under the same precision reproduces. Mixed precision is a GPU setting; elsewhere
    fp32, and on a GPU full fp32 (`full_fp32`)."""
    if device.type == "cuda" and precision in AUTOCAST:
        return torch.autocast("cuda", dtype=AUTOCAST[precision])
    return full_fp32() if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """No TF32 inside the block: cuDNN convolutions use TF32 by default on Ampere and later GPUs
    (10 bits of mantissa), which would make a stored and a re-scored "fp32" score differ by
    ~1e-3; validation sets are small, so full fp32 costs little."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def own_forward(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module with its own forward for the block: accelerator.prepare wraps a module's forward
    in autocast when training in mixed precision, and an autocast context entered inside the
    forward overrides any outside it. Validation and re-scores run the module's own, fp32, forward."""
    original = module.__dict__.get("_original_forward")
    if original is None:
        yield module
        return
    wrapped = module.__dict__["forward"]
    module.forward = original
    try:
        yield module
    finally:
        module.forward = wrapped


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: DataLoader,
    accelerator: Accelerator | None = None,
    precision: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 2) float32 and labels (N,) over a loader, in eval mode without gradients, the
    forward pass under `precision` (see `autocast`).

    With an accelerator (prepared loader), batches are gathered from every process without the
    duplicates that even batches add; without one, batches go to the model's device.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for x, y in loader:
        if accelerator is None:
            x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            out = model(x.float()).float()  # resident host batches arrive as float16
        if accelerator is not None:
            out, y = accelerator.gather_for_metrics((out, y))
        logits.append(out.cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def score(logits: np.ndarray, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """Metrics (val_loss = cross-entropy for every policy, so policies compare) and p(HGG) (N,)."""
    t = torch.from_numpy(logits).double()
    p_hgg = torch.softmax(t, dim=1)[:, 1].numpy()
    metrics = classification_metrics(labels, p_hgg)
    metrics["loss"] = float(F.cross_entropy(t, torch.from_numpy(labels).long()))
    return metrics, p_hgg


def resolve_device(device: str | None) -> torch.device:
    """--device as a torch.device that can hold a tensor here; cuda when available by default."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except Exception as e:  # unknown names raise RuntimeError, absent backends other types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BratsError(f"--device {device!r}: not usable here ({first[:120]}): use cpu or cuda") from e
    return dev
