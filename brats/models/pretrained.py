"""Tencent MedicalNet's pretrained weights: where to find them and how they load into ResNet3D.

MedicalNet ships `resnet_<depth>_23dataset.pth` as `{'state_dict': {'module.conv1.weight':
[64, 1, 7, 7, 7], ...}}`, a segmentation backbone with a `conv_seg` head. The backbone loads
strictly (key names match ResNet3D's); conv1 is adapted from 1 input channel to C.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch

from brats.errors import BratsError
from brats.models.resnet import CLASSIFIER_PREFIX, ResNet3D

log = logging.getLogger(__name__)

MEDICALNET = "medicalnet"  # --pretrained medicalnet: Tencent's published weights for --depth
MEDICALNET_HUB = "TencentMedicalNet/MedicalNet-Resnet{depth}"


MEDICALNET_FILE = "resnet_{depth}_23dataset.pth"


PROBE_SECONDS = 3.0  # how long the hub may take to accept a connection before it counts as unreachable
TRUE = ("1", "true", "yes", "on")


def cached_medicalnet(depth: int, cache_dir: str | Path | None = None) -> Path | None:
    """MedicalNet's weights for `depth` in the Hugging Face cache, or None (no network)."""
    from huggingface_hub import hf_hub_download

    repo, name = MEDICALNET_HUB.format(depth=depth), MEDICALNET_FILE.format(depth=depth)
    try:
        return Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True))
    except Exception:
        return None


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here, found in at most PROBE_SECONDS; None when it can
    (or a proxy decides). HF_HUB_OFFLINE=1 is the user saying so: nothing is tried."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy knows the way: let the download try
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except OSError as e:
        return f"{host} unreachable: {e.strerror or type(e).__name__}"


def pretrained_problem(spec: str | None, depth: int, cache_dir: str | Path | None = None) -> str | None:
    """What stands in the way of --pretrained, in one line with the fix, found before anything
    slow (the weights are fetched later, by one process): a missing file, or MedicalNet's weights
    neither cached nor reachable. None when nothing does."""
    if not spec:
        return None
    name = MEDICALNET_FILE.format(depth=depth)
    if spec != MEDICALNET:
        if Path(spec).is_file():
            return None
        return f"--pretrained {spec}: file not found: give MedicalNet's {name} or --pretrained medicalnet"
    if cached_medicalnet(depth, cache_dir) is not None:
        return None
    why = hub_unreachable()
    return None if why is None else offline_message(depth, why)


def offline_message(depth: int, why: str) -> str:
    repo, name = MEDICALNET_HUB.format(depth=depth), MEDICALNET_FILE.format(depth=depth)
    return (
        f"--pretrained medicalnet: {name} is not in the Hugging Face cache and cannot be fetched ({why}): "
        f"download it on a connected machine (huggingface.co/{repo}, or MedicalNet's release) and pass "
        f"--pretrained PATH/{name}"
    )


def resolve_pretrained(spec: str, depth: int, cache_dir: str | Path | None = None) -> Path:
    """--pretrained as a file: a path as given, or `medicalnet` as MedicalNet's weights for
    `depth` from the Hugging Face cache, downloaded there first when missing (once; later runs
    and other processes read the cache). Offline (HF_HUB_OFFLINE, or the hub unreachable within
    PROBE_SECONDS) and not cached: one line with the manual route, at once."""
    problem = pretrained_problem(spec, depth, cache_dir)
    if problem:
        raise BratsError(problem)
    if spec != MEDICALNET:
        return Path(spec)
    cached = cached_medicalnet(depth, cache_dir)
    if cached is not None:  # the cache first: no network round trip when the weights are there
        return cached
    from huggingface_hub import hf_hub_download

    repo, name = MEDICALNET_HUB.format(depth=depth), MEDICALNET_FILE.format(depth=depth)
    try:
        return Path(hf_hub_download(repo, name, cache_dir=cache_dir))
    except Exception as e:  # no route, HTTP errors: all mean "not available here"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise BratsError(offline_message(depth, reason)) from e


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
