"""Exponential moving average of model weights (RECIPE.md 3.4.4: decay 0.995, after each optimizer step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A frozen copy of the (unwrapped) model whose weights trail the trained ones.

    Floating-point tensors (weights and BN running stats) move by `lerp_`; integer buffers
    (`num_batches_tracked`) are copied. Call `update` only after a real optimizer step.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_t, t in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_t.dtype.is_floating_point:
                ema_t.lerp_(t.detach(), 1.0 - self.decay)
            else:
                ema_t.copy_(t)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
