"""Logits and metrics over a loader: shared by validation during training and by evaluation.

Nothing here trains, so evaluation and export import it without the training loop.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from brats.metrics import classification_metrics


@torch.no_grad()
def predict(
    model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 2) float32 and labels (N,) over a loader, in eval mode without gradients.

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
