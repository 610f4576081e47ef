"""Where the model looked: class activation maps (exact for this network) and Grad-CAM.

ResNet3D ends in global average pooling, dropout and one linear layer, so in eval mode
    logit_c = W_c . mean_v A(v) + b_c = mean_v (W_c . A(v)) + b_c
for the last feature maps A (F channels over d x h x w voxels): the class activation map
W_c . A(v) splits the logit exactly over the voxels. We map HGG evidence, W_HGG - W_LGG:
p(HGG) = sigmoid(logit_HGG - logit_LGG) depends on the difference only, so this one map says
what raised (> 0) or lowered (< 0) p(HGG); a single class's map would mix in what both classes
share. Upsampled to the input cube (trilinear, align_corners=False), its voxel mean is still
logit_HGG - logit_LGG - (b_HGG - b_LGG) whenever the cube side is a whole multiple of the
feature maps' side (S = 128 -> 4^3 with the strided layout, 16^3 with the dilated one).
That side bounds what the map can show: one cell per 32 input voxels in the strided layout (at
S <= 32 the map is a constant), one per 8 in the dilated one.

Grad-CAM (`grad_cam`) reaches the layers before the last, for research; the deployed map is the
CAM of `ExplainedModel`, which exports to ONNX beside the probabilities. `brats.deploy.cam` (no
torch) maps a CAM back onto the patient's scan and draws it; `brats.evaluation.cam_montage`
(evaluate.py --cam) draws each fold's most confident right and wrong validation patients.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brats.data.cohort import CLASSES
from brats.errors import BratsError
from brats.models.resnet import ResNet3D

HGG, LGG = CLASSES.index("HGG"), CLASSES.index("LGG")


def hgg_evidence_weights(model: ResNet3D) -> tuple[torch.Tensor, torch.Tensor]:
    """(F,) classifier weights and () bias of logit_HGG - logit_LGG."""
    return model.fc.weight[HGG] - model.fc.weight[LGG], model.fc.bias[HGG] - model.fc.bias[LGG]


def upsample(maps: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """(B, d, h, w) -> (B, *size), trilinear with align_corners=False (mean-preserving for
    whole-number scale factors)."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="trilinear", align_corners=False)[:, 0]


def coarse_cam(model: ResNet3D, maps: torch.Tensor) -> torch.Tensor:
    """(B, F, d, h, w) last feature maps -> (B, d, h, w) HGG-evidence map at their resolution."""
    weights, _ = hgg_evidence_weights(model)
    return (maps * weights.view(1, -1, 1, 1, 1)).sum(dim=1)


def cam_from_maps(model: ResNet3D, maps: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """(B, F, d, h, w) last feature maps -> (B, *size) HGG-evidence map."""
    return upsample(coarse_cam(model, maps), size)


def class_activation_map(model: ResNet3D, x: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S, S) -> (B, S, S, S) float32 HGG-evidence map, in logit units per voxel.

    Put the model in eval mode first: in train mode dropout changes the logits it explains.
    """
    return cam_from_maps(model, model.feature_maps(x), x.shape[2:]).float()


class ExplainedModel(nn.Module):
    """One fold model or an ensemble, (B, C, S, S, S) -> probabilities (B, 2) [p_LGG, p_HGG]
    (the folds' mean softmax), logits (B, 2) (their mean) and cam (B, S, S, S) (their mean
    HGG-evidence map); one backbone pass per fold serves both the logits and the map. Eval
    mode only: the logits are the pooled maps through `fc`, without dropout.

    The folds' coarse maps are averaged before the one upsampling, which is linear, so this is
    the mean of the folds' upsampled maps at 1/M of the upsampling's cost (the folds of one run
    share an architecture, hence the coarse maps' shape)."""

    def __init__(self, models: list[ResNet3D], references: list[FeatureReference] | None = None):
        super().__init__()
        if not models:
            raise BratsError("no fold model to explain")
        if references is not None and len(references) != len(models):
            raise BratsError(f"{len(references)} feature references for {len(models)} fold models")
        self.models = nn.ModuleList(models)
        self.references = nn.ModuleList(references) if references is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """probabilities (B, 2), logits (B, 2), cam (B, S, S, S), and with feature references the
        model's own doubt: each fold's p(HGG) (B, M) and the mean of the folds' feature distances
        to their training patients (B,)."""
        logits, cams, distances = [], [], []
        for k, model in enumerate(self.models):
            maps = model.feature_maps(x)  # (B, F, d, h, w)
            pooled = maps.mean(dim=(2, 3, 4))  # (B, F): the features the classifier reads
            logits.append(model.fc(pooled))
            cams.append(coarse_cam(model, maps))
            if self.references is not None:
                distances.append(self.references[k](pooled))
        stacked = torch.stack(logits)  # (M, B, 2)
        probabilities = torch.softmax(stacked, dim=-1)  # (M, B, 2)
        cam = upsample(torch.stack(cams).mean(0), x.shape[2:])  # (B, S, S, S)
        outputs = (probabilities.mean(0), stacked.mean(0), cam)
        if self.references is None:
            return outputs
        return (*outputs, probabilities[..., HGG].transpose(0, 1), torch.stack(distances).mean(0))


class FeatureReference(nn.Module):
    """Where one fold model's training patients lie in its pooled features (the classifier's
    input), and how far a new patient is from them: a Mahalanobis distance in the `k` leading
    principal directions plus the residual outside them, each scaled by the training patients'
    own spread, averaged over the k + 1 terms (about 1 for a training patient)."""

    def __init__(
        self, mean: torch.Tensor, directions: torch.Tensor, variances: torch.Tensor, residual: float
    ):
        super().__init__()
        self.register_buffer("mean", mean.float())  # (F,)
        self.register_buffer("directions", directions.float())  # (F, k) orthonormal
        self.register_buffer("scale", variances.float().clamp_min(1e-12).rsqrt())  # (k,)
        self.residual = max(float(residual), 1e-12)  # mean squared residual of the training patients

    @classmethod
    def fit(cls, features: torch.Tensor, k: int = 16) -> FeatureReference:
        """From (N, F) training features. k is capped at a third of the patients, so that the
        residual outside the k directions is measured on the training patients rather than fitted
        away (N points span N - 1 directions), and the residual's scale is floored at a thousandth
        of the total variance (a float32 graph computes it as a difference of near-equal terms)."""
        n = features.shape[0]
        centred = features.double() - features.double().mean(0)
        _, s, vt = torch.linalg.svd(centred, full_matrices=False)
        k = max(1, min(k, (n - 1) // 3))
        directions = vt[:k].T  # (F, k)
        variances = s[:k] ** 2 / max(n - 1, 1)
        residual = centred - centred @ directions @ directions.T
        total = float((s**2).sum()) / max(n - 1, 1)
        mean_residual = max(float((residual**2).sum(1).mean()), 1e-3 * total)
        return cls(features.double().mean(0), directions, variances, mean_residual)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B,) distances."""
        centred = features - self.mean
        z = centred @ self.directions  # (B, k)
        residual = centred - z @ self.directions.T
        inside = ((z * self.scale) ** 2).sum(1)
        outside = (residual**2).sum(1) / self.residual
        return (inside + outside) / (z.shape[1] + 1)


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module | str, relu: bool = False) -> torch.Tensor:
    """Grad-CAM of logit_HGG - logit_LGG at any `layer` (a module or its name, e.g. "layer3")
    -> (B, S, S, S) float32, upsampled like the CAM.

    Channel weights are the layer's gradients averaged over its voxels; `relu` keeps only
    positive evidence (the usual Grad-CAM), off by default so that the sign means what the CAM's
    does. At `layer4` without ReLU this is the CAM divided by the number of feature-map voxels.
    Use eval mode: in train mode BatchNorm couples the samples of a batch and dropout is random.
    """
    module = model.get_submodule(layer) if isinstance(layer, str) else layer
    seen: dict[str, torch.Tensor | int] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        seen["maps"], seen["version"] = output, output._version

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            maps = seen.get("maps")
            if not isinstance(maps, torch.Tensor) or maps.dim() != 5:
                raise BratsError(
                    f"grad_cam: layer {layer!r} gave no (B, F, d, h, w) output in the forward pass"
                )
            if maps._version != seen["version"]:
                raise BratsError(
                    f"grad_cam: the output of layer {layer!r} is changed in place later in the network "
                    "(e.g. by an in-place ReLU): choose a layerN, one of its blocks or a conv"
                )
            target = (logits[:, HGG] - logits[:, LGG]).sum()  # samples are independent in eval mode
            (grads,) = torch.autograd.grad(target, maps)
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3, 4), keepdim=True)  # (B, F, 1, 1, 1)
    coarse = (weights * maps).sum(dim=1).detach()  # (B, d, h, w)
    if relu:
        coarse = coarse.clamp_min(0.0)
    return upsample(coarse, x.shape[2:]).float()


@torch.no_grad()
def explain(models: list[ResNet3D], volumes: np.ndarray, batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, S, S, S) preprocessed patients -> p(HGG) (N,) and the (ensemble's) CAM
    (N, S, S, S), both float32 numpy, on the models' device; the models keep their mode."""
    explained = ExplainedModel(models)
    modes = [m.training for m in models]
    device = next(models[0].parameters()).device
    p_hgg, cams = [], []
    try:
        explained.eval()
        for start in range(0, len(volumes), batch):
            x = torch.from_numpy(np.ascontiguousarray(volumes[start : start + batch], dtype=np.float32))
            probabilities, _, cam = explained(x.to(device))
            p_hgg.append(probabilities[:, HGG].float().cpu().numpy())
            cams.append(cam.float().cpu().numpy())
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return np.concatenate(p_hgg), np.concatenate(cams)
