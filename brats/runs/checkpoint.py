"""Checkpoints that can be trusted: one schema, atomic writes, plain contents, an explicit policy.

A checkpoint holds tensors and plain Python values only (the config as a dict, never a pickled
Namespace), so `torch.load(weights_only=True)` reads it. `Checkpoint` is its one schema: every
writer builds one and every reader gets one, with the defaults for fields older files lack
decided here once. `brats.runs.keeper` decides which epochs become best.pt / best_ema.pt. The
resume state (state.pt) is a dict of objects with `state_dict()` / `load_state_dict()`, written
and read by `save_resume_state` / `load_resume_state`.

The selection policy (RECIPE.md 3.5 / 6.6): best_ema.pt when the run used EMA and the file exists,
else best.pt, else an error; never the resume state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from brats.errors import BratsError
from brats.io.atomic import write_atomic
from brats.runs.paths import BEST, BEST_EMA, STATE

log = logging.getLogger(__name__)

REQUIRED = ("model_state_dict", "val_metrics")


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """The contents of best.pt / best_ema.pt. Fields after the first two are optional in files
    written by older code; those take the defaults given here."""

    model_state_dict: dict[str, torch.Tensor]  # weights of the unwrapped model, on the CPU
    val_metrics: dict[str, Any]  # metrics of `epoch` on the patients that chose it
    epoch: int = -1  # 1-based epoch of the weights; -1 = unknown
    is_ema: bool = False  # EMA weights; a file without the field is EMA when named *_ema.pt
    config: dict[str, Any] | None = None  # TrainConfig.to_dict(); None = use the run's config.json
    fold: int | None = None  # 0-based fold index
    splits_fingerprint: str | None = None  # cohort fingerprint of splits.json; None = not checked
    protocol: str | None = None  # how the epoch was chosen (folds.protocol)
    val_patients: list[str] = field(default_factory=list)  # patients that chose the epoch
    preprocess: dict[str, Any] | None = None  # the cache's preprocessing settings
    brats_version: str | None = None  # brats version that wrote the file
    mixed_precision: str | None = None  # forward precision of the validation ("no", "bf16", "fp16")
    val_probabilities: dict[str, float] = field(default_factory=dict)  # p(HGG) per val patient

    @property
    def val_auc(self) -> float:
        """The stored validation AUC; NaN when the file has none."""
        auc = self.val_metrics.get("auc") if isinstance(self.val_metrics, dict) else None
        return float(auc) if auc is not None else math.nan

    def to_payload(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict would deep-copy every tensor.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | Path) -> Checkpoint:
        """A loaded dict as a Checkpoint: unknown keys are ignored, missing optional ones take
        their defaults, a missing `is_ema` is read from the file name."""
        missing = [k for k in REQUIRED if k not in payload]
        if missing:
            raise BratsError(
                f"{path}: checkpoint lacks {', '.join(missing)} (required: {', '.join(REQUIRED)})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in payload.items() if k in known and v is not None}
        kwargs.setdefault("is_ema", Path(path).name.endswith("_ema.pt"))
        kwargs["is_ema"], kwargs["epoch"] = bool(kwargs["is_ema"]), int(kwargs.get("epoch", -1))
        return cls(**kwargs)


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of the module's weights on the CPU (independent of later training steps)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, os.replace: a kill never tears a file."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, trust: bool = False, map_location: str = "cpu") -> dict:
    """Load with weights_only=True; a checkpoint that needs unpickling loads only with `trust`.

    Older training code saved argparse.Namespace or numpy scalars; since PyTorch 2.6 those fail
    under weights_only=True (RECIPE.md 3.6). `trust` (the --trust-checkpoints flag) allows the full
    unpickler for files the user made themselves.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise BratsError(
                f"{path}: holds pickled Python objects that weights_only loading refuses "
                "(e.g. an argparse.Namespace from older code); "
                "if you made this file, pass --trust-checkpoints"
            ) from e
        log.warning("%s: loading with weights_only=False (--trust-checkpoints)", path)
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise BratsError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise BratsError(f"{path}: not a checkpoint dict (got {type(ckpt).__name__})")
    Checkpoint.from_payload(ckpt, path)  # the required fields are there
    return ckpt


def read_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """A best checkpoint file as a Checkpoint (see `load_checkpoint` for `trust`)."""
    return Checkpoint.from_payload(load_checkpoint(path, trust=trust), path)


def select_checkpoint(fold_dir: str | Path, ema_enabled: bool) -> Path:
    """The explicit policy (RECIPE.md 6.6): best_ema.pt (EMA on and present), else best.pt, else error."""
    fold_dir = Path(fold_dir)
    if ema_enabled and (fold_dir / BEST_EMA).exists():
        return fold_dir / BEST_EMA
    if (fold_dir / BEST).exists():
        return fold_dir / BEST
    raise BratsError(
        f"{fold_dir}: no {BEST}{' or ' + BEST_EMA if ema_enabled else ''} (never falling back to {STATE}); "
        "train this fold first"
    )


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class RngState:
    """torch's CPU and CUDA generators. Numpy's and Python's are not used in training; torch's
    are reseeded per epoch anyway, and saved so that a resumed epoch starts where it left off."""

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# Entries state.pt must hold when the run needs them, and what their absence means. Any other
# entry a file lacks (added by a later brats version) leaves its object as initialised.
_MISSING_HINT = {
    "ema_state_dict": "saved without EMA but --ema-decay is set now; resume with the same settings",
}


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_resume_state(path: str | Path, objects: dict[str, Stateful], extra: dict[str, Any]) -> None:
    """state.pt: each object's state_dict under its name (tensors on the CPU), plus `extra`."""
    save_atomic({**extra, **{name: _to_cpu(obj.state_dict()) for name, obj in objects.items()}}, path)


def _upgrade(blob: dict[str, Any]) -> dict[str, Any]:
    """The layout of a state.pt written before the keepers and the RNG had their own entries."""
    fold_state = blob.get("fold_state") or {}
    for name in ("best", "best_ema"):  # FoldState held best_auc, best_epoch, best_ema_auc, ...
        if name not in blob and f"{name}_auc" in fold_state:
            blob[name] = {"best_auc": fold_state[f"{name}_auc"], "best_epoch": fold_state[f"{name}_epoch"]}
    if "rng" not in blob and "rng_cpu" in blob:
        blob["rng"] = {"cpu": blob["rng_cpu"], "cuda": blob.get("rng_cuda", [])}
    return blob


def load_resume_state(path: str | Path, objects: dict[str, Stateful]) -> None:
    """Restore each object from its entry in state.pt (older layouts upgraded first)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BratsError(
            f"{path}: cannot read the resume state ({type(e).__name__}: {e}); delete it to start over"
        ) from e
    blob = _upgrade(blob)
    finished = (blob.get("fold_state") or {}).get("finished", False)  # holds no weights
    for name, obj in objects.items():
        if blob.get(name) is not None:
            obj.load_state_dict(blob[name])
        elif name in _MISSING_HINT and not finished:
            raise BratsError(f"{path}: {_MISSING_HINT[name]}")
