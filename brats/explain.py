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
CAM of `ExplainedModel`, which exports to ONNX beside the probabilities. `brats.cam` (no torch)
maps a CAM back onto the patient's scan and draws it; `write_evaluation_montages` (evaluate.py
--cam) draws each fold's most confident right and wrong validation patients.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brats.atomic import atomic_path
from brats.cache import open_data
from brats.cam import render_planes
from brats.cohort import CLASSES
from brats.config import TrainConfig
from brats.data import CachedVolumes
from brats.errors import BratsError
from brats.evaluation import check_preprocessing, load_best_model, model_config, resolve_device, run_config
from brats.model import ResNet3D
from brats.runs import RunPaths

HGG, LGG = CLASSES.index("HGG"), CLASSES.index("LGG")
OUTPUT_NAMES = ("probabilities", "logits", "cam")  # ExplainedModel's outputs, in order
DYNAMIC_AXES = {"input": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}


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

    def __init__(self, models: list[ResNet3D]):
        super().__init__()
        if not models:
            raise BratsError("no fold model to explain")
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, cams = [], []
        for model in self.models:
            maps = model.feature_maps(x)  # (B, F, d, h, w)
            logits.append(model.fc(maps.mean(dim=(2, 3, 4))))
            cams.append(coarse_cam(model, maps))
        stacked = torch.stack(logits)  # (M, B, 2)
        cam = upsample(torch.stack(cams).mean(0), x.shape[2:])  # (B, S, S, S)
        return torch.softmax(stacked, dim=-1).mean(0), stacked.mean(0), cam


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


def write_cam_montage(
    models: list[ResNet3D],
    volumes: np.ndarray,
    titles: list[str],
    path: str | Path,
    underlay_channel: int = -1,
) -> np.ndarray:
    """A PNG with one row per preprocessed patient (N, C, S, S, S): three planes of channel
    `underlay_channel` (default the last, FLAIR in the standard order) through the peak of the
    evidence for the predicted grade, the (ensemble's) CAM over them, titled `titles[i]` and
    its p(HGG); written atomically. Returns p(HGG) (N,). Models keep their mode."""
    import matplotlib

    matplotlib.use("Agg")  # no display: also on servers
    import matplotlib.pyplot as plt

    if len(titles) != len(volumes) or not len(volumes):
        raise BratsError(f"{path}: give one title per patient ({len(titles)} for {len(volumes)})")
    p_hgg, cams = explain(models, volumes)
    pictures = [
        render_planes(np.asarray(v[underlay_channel], dtype=np.float32), cam, toward_hgg=bool(p >= 0.5))
        for v, cam, p in zip(volumes, cams, p_hgg)
    ]
    height, width = max(r.shape[0] for r, _ in pictures), max(r.shape[1] for r, _ in pictures)
    fig, axes = plt.subplots(
        len(pictures), 1, figsize=(width / 100, len(pictures) * (height / 100 + 0.35)), squeeze=False
    )
    for ax, (rgb, at), title, p in zip(axes[:, 0], pictures, titles, p_hgg):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(
            f"{title}  p(HGG) {p:.3f}  (axial, coronal, sagittal through z, y, x = {at}; R on the left; "
            "red HGG, blue LGG evidence)",
            fontsize=7,
        )
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return p_hgg


def confident_right_and_wrong(rows: list[dict]) -> list[tuple[str, dict]]:
    """Of one fold's scored patients (dicts with `patient_id`, `label` 0/1 and `p_hgg`), the
    most confident right and the most confident wrong (farthest from p = 0.5 on the side of the
    grade it predicted), as [("right", row), ("wrong", row)]; a kind no patient has is left out."""
    picks = []
    for kind, right in (("right", True), ("wrong", False)):
        group = [r for r in rows if ((float(r["p_hgg"]) >= 0.5) == (int(r["label"]) == 1)) == right]
        if group:
            picks.append((kind, max(group, key=lambda r: abs(float(r["p_hgg"]) - 0.5))))
    return picks


def read_predictions(run: Path) -> list[dict]:
    path = RunPaths(run).predictions
    if not path.is_file():
        raise BratsError(f"{run}: not evaluated yet (no {path}): run python evaluate.py --run {run}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_evaluation_montages(
    run: str | Path,
    folds: list[int] | None = None,
    trust: bool = False,
    data: str | None = None,
    device: str | None = None,
) -> list[Path]:
    """For each evaluated fold (of `folds`, default all in RUN/evaluation/predictions.csv):
    RUN/evaluation/fold_K/cam_montage.png, its most confident right and wrong validation
    patients with the fold model's CAM over their FLAIR (the model chosen by evaluate.py's
    policy, the patients' volumes from the cache it scored). Returns the files written."""
    run = Path(run)
    paths = RunPaths(run)
    rows = read_predictions(run)
    run_cfg = run_config(run)
    cfg = TrainConfig.from_dict(run_cfg)
    dev = resolve_device(device)
    evaluated = sorted({int(r["fold"]) for r in rows})
    wanted = [k for k in evaluated if folds is None or k in folds]
    cached = open_data(data or cfg.data, cfg.size)
    written = []
    for k in wanted:
        model, ckpt, path = load_best_model(run, k, run_cfg, trust)
        check_preprocessing(cached, ckpt.preprocess, path)
        modalities = tuple(model_config(ckpt, run_cfg)["modalities"])
        picks = confident_right_and_wrong([r for r in rows if int(r["fold"]) == k])
        ds = CachedVolumes(cached, cached.indices([r["patient_id"] for _, r in picks]), modalities)
        volumes = np.stack([ds[i][0].numpy() for i in range(len(ds))])
        titles = [
            f"fold {k}, most confident {kind}: {r['patient_id']} ({CLASSES[int(r['label'])]})"
            for kind, r in picks
        ]
        underlay = modalities.index("flair") if "flair" in modalities else -1
        write_cam_montage([model.to(dev)], volumes, titles, paths.cam_montage(k), underlay)
        written.append(paths.cam_montage(k))
    return written
