"""Tencent MedicalNet's pretrained weights: where to find them and how they load into ResNet3D.

MedicalNet ships `resnet_<depth>_23dataset.pth` as `{'state_dict': {'module.conv1.weight':
[64, 1, 7, 7, 7], ...}}`, a segmentation backbone with a `conv_seg` head. The backbone loads
strictly (key names match ResNet3D's); conv1 is adapted from 1 input channel to C.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from brats.errors import BratsError
from brats.models.resnet import CLASSIFIER_PREFIX, ResNet3D

log = logging.getLogger(__name__)

MEDICALNET = "medicalnet"  # --pretrained medicalnet: Tencent's published weights for --depth
MEDICALNET_HUB = "TencentMedicalNet/MedicalNet-Resnet{depth}"


MEDICALNET_FILE = "resnet_{depth}_23dataset.pth"


def resolve_pretrained(spec: str, depth: int, cache_dir: str | Path | None = None) -> Path:
    """--pretrained as a file: a path as given, or `medicalnet` as MedicalNet's weights for
    `depth` from the Hugging Face cache, downloaded there first when missing (once; later runs
    and other processes read the cache). Offline and not cached: one line with the manual route."""
    if spec != MEDICALNET:
        if not Path(spec).is_file():
            raise BratsError(
                f"--pretrained {spec}: file not found: give MedicalNet's "
                f"{MEDICALNET_FILE.format(depth=depth)} "
                "or --pretrained medicalnet"
            )
        return Path(spec)
    from huggingface_hub import hf_hub_download

    repo, name = MEDICALNET_HUB.format(depth=depth), MEDICALNET_FILE.format(depth=depth)
    try:  # the cache first: no network round trip when the weights are there
        return Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(hf_hub_download(repo, name, cache_dir=cache_dir))
    except Exception as e:  # offline, no route, HTTP errors: all mean "not available here"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise BratsError(
            f"--pretrained medicalnet: cannot fetch {name} from huggingface.co/{repo} ({reason}): "
            f"download it on a connected machine (huggingface.co/{repo}, or MedicalNet's release) "
            f"and pass --pretrained PATH/{name}"
        ) from e


def load_pretrained(model: ResNet3D, path: str | Path) -> dict:
    """Load a MedicalNet checkpoint into the backbone, strictly; returns what was loaded.

    Accepts `{'state_dict': {...}}` with `module.` prefixes (MedicalNet's files) or a bare state
    dict. The segmentation head (`conv_seg.*`) is dropped; `num_batches_tracked` may be absent
    (older PyTorch). conv1 is adapted from 1 input channel to C (repeated, divided by C).
    """
    path = Path(path)
    if not path.is_file():
        raise BratsError(f"--pretrained {path}: file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BratsError(
            f"--pretrained {path}: cannot load as a weights-only checkpoint ({type(e).__name__}: {e})"
        ) from e
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BratsError(f"--pretrained {path}: expected {{'state_dict': {{name: tensor}}}} or a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    dropped = sorted(k for k in state if k.startswith("conv_seg."))
    state = {k: v for k, v in state.items() if not k.startswith("conv_seg.")}

    own = {k: v for k, v in model.state_dict().items() if not k.startswith(CLASSIFIER_PREFIX)}
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    if "conv1.weight" in state:
        w = state["conv1.weight"]
        c = model.in_channels
        if w.ndim == 5 and w.shape[1] != c and w.shape[1] == 1:
            state["conv1.weight"] = w.repeat(1, c, 1, 1, 1) / c  # keeps the response to a uniform input
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}")
        if mismatched:
            parts.append(f"shape mismatch: {', '.join(mismatched[:5])}")
        raise BratsError(
            f"--pretrained {path} does not fit ResNet-{model.depth} ({model.shortcut} shortcut): "
            + "; ".join(parts)
            + " (check --depth; MedicalNet files are resnet_<depth>_23dataset.pth)"
        )
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys  # checked above
    info = {
        "path": str(path),
        "loaded": len(state),
        "dropped": len(dropped),
        "conv1_in_channels": model.in_channels,
    }
    log.info(
        "loaded %d backbone tensors from %s (dropped %d conv_seg tensors; conv1 adapted to %d channels; "
        "classifier fc initialised fresh)",
        info["loaded"],
        path,
        info["dropped"],
        model.in_channels,
    )
    return info
