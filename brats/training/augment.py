"""Batch augmentation on the training device with batched torch ops (no CPU bottleneck).

One spatial transform per sample shared by all its channels (so modalities stay aligned, seed
6.2): left-right flip, small rotation about each axis, isotropic scale; one trilinear
`grid_sample` for the whole batch. Then a per-channel intensity scale and shift inside the brain
(voxels non-zero in any channel), background kept at 0. Random draws come from a CPU generator,
so the same seed gives the same augmentation on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from brats.training.speed import to_device


@dataclass(frozen=True)
class AugmentConfig:
    flip_lr: float = 0.5  # probability of a left-right flip (anatomically plausible; others are not)
    max_rotation_deg: float = 10.0  # per axis
    scale: tuple[float, float] = (0.9, 1.1)
    intensity_scale: tuple[float, float] = (0.9, 1.1)  # per channel
    intensity_shift: float = 0.1  # per channel, in z-score units


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) radians about x, y, z -> (B, 3, 3) rotation matrices."""
    cx, cy, cz = torch.cos(angles).unbind(1)
    sx, sy, sz = torch.sin(angles).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """(B, C, D, H, W) float on any device -> same shape, augmented. `generator` is a CPU
    generator: every draw is made on the CPU and the batch's parameters reach the device in one
    copy that does not wait for it (brats.training.speed.to_device)."""
    if generator.device.type != "cpu":
        raise ValueError(
            f"augmentation draws from a CPU generator (the same numbers on every device), not a "
            f"{generator.device.type} one: pass torch.Generator()"
        )
    b, c = x.shape[:2]
    g = generator
    flip = torch.where(torch.rand(b, generator=g) < cfg.flip_lr, -1.0, 1.0)
    angles = (torch.rand(b, 3, generator=g) * 2 - 1) * math.radians(cfg.max_rotation_deg)
    scale = torch.empty(b).uniform_(*cfg.scale, generator=g)
    i_scale = torch.empty(b, c).uniform_(*cfg.intensity_scale, generator=g)
    i_shift = (torch.rand(b, c, generator=g) * 2 - 1) * cfg.intensity_shift

    # affine_grid maps output coords to input coords (x, y, z = W, H, D); flipping x = W axis.
    theta = rotation_matrices(angles) / scale.view(b, 1, 1)
    theta[:, :, 0] *= flip.view(b, 1)
    theta = torch.cat([theta, torch.zeros(b, 3, 1)], dim=2)  # (B, 3, 4)
    params = to_device(torch.cat([theta.view(b, 12), i_scale, i_shift], dim=1), x.device).to(x.dtype)
    theta, i_scale, i_shift = params[:, :12].view(b, 3, 4), params[:, 12 : 12 + c], params[:, 12 + c :]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    brain = (x != 0).any(dim=1, keepdim=True)
    x = x * i_scale.reshape(b, c, 1, 1, 1) + i_shift.reshape(b, c, 1, 1, 1)
    return x * brain
