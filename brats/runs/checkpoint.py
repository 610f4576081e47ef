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
from numbers import Integral, Real
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
    patients_fingerprint: str | None = None  # the fold's train/val/test patients (folds.Fold)

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
        problem = payload_problem(payload)
        if problem:
            raise BratsError(f"{path}: damaged checkpoint ({problem}): restore it, or train the fold again")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in payload.items() if k in known and v is not None}
        kwargs.setdefault("is_ema", Path(path).name.endswith("_ema.pt"))
        kwargs["is_ema"], kwargs["epoch"] = bool(kwargs["is_ema"]), int(kwargs.get("epoch", -1))
        return cls(**kwargs)


def payload_problem(payload: dict[str, Any]) -> str:
    """What is wrong with the structure or ranges of a loaded checkpoint ("" when nothing)."""
    weights, metrics = payload["model_state_dict"], payload["val_metrics"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        return "model_state_dict is not a mapping of tensors"
    if not isinstance(metrics, dict):
        return f"val_metrics is a {type(metrics).__name__}"
    auc = metrics.get("auc")
    if auc is not None and (not isinstance(auc, Real) or not (math.isnan(auc) or 0 <= auc <= 1)):
        return f"val AUC {auc!r}"
    for name, lowest in (("epoch", -1), ("fold", 0)):
        value = payload.get(name)
        if value is not None and (
            not isinstance(value, Integral) or isinstance(value, bool) or value < lowest
        ):
            return f"{name} {value!r}"
    probabilities = payload.get("val_probabilities") or {}
    if not isinstance(probabilities, dict) or not all(
        isinstance(p, Real) and 0 <= p <= 1 for p in probabilities.values()
    ):
        return "val_probabilities are not probabilities"
    if payload.get("config") is not None and not isinstance(payload["config"], dict):
        return f"config is a {type(payload['config']).__name__}"
    return ""


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of the module's weights on the CPU (independent of later training steps)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, os.replace: a kill never tears a file.
    torch.save reports a failed write (a full disk) as a RuntimeError: it becomes the one line
    every failed write gets."""

    def write(f) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            raise OSError(None, str(e)) from e

    write_atomic(path, write)


def load_checkpoint(path: str | Path, trust: bool = False, map_location: str = "cpu") -> dict:
    """Load with weights_only=True; a checkpoint that needs unpickling loads only with `trust`.

    Older training code saved argparse.Namespace or numpy scalars; since PyTorch 2.6 those fail
    under weights_only=True (RECIPE.md 3.6). `trust` (the --trust-checkpoints flag) allows the full
    unpickler for files the user made themselves.
    """
    path = Path(path)
    damaged = "restore it, or train the fold again"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a checkpoint at all: never advise unpickling it
            raise BratsError(
                f"{path}: damaged or not a checkpoint (it does not load as one): {damaged}"
            ) from e
        if not trust:
            raise BratsError(
                f"{path}: holds pickled Python objects that weights_only loading refuses "
                "(e.g. an argparse.Namespace from older code); "
                "if you made this file, pass --trust-checkpoints"
            ) from e
        log.warning("%s: loading with weights_only=False (--trust-checkpoints)", path)
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e2:
            first = (str(e2).strip().splitlines() or [type(e2).__name__])[0][:120]
            raise BratsError(
                f"{path}: cannot read checkpoint ({type(e2).__name__}: {first}): {damaged}"
            ) from e2
    except Exception as e:  # truncated, not a zip, unreadable, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise BratsError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first}): {damaged}") from e
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
    """torch's CPU generator and this process's CUDA generator. Numpy's and Python's are not used
    in training; torch's are reseeded per epoch anyway, and saved so that a resumed epoch starts
    where it left off. Only the current device's CUDA state is kept: a run resumed with fewer GPUs
    visible (one per fold under `make cv GPUS=...`) has fewer generators to restore."""

    def state_dict(self) -> dict[str, Any]:
        cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        cuda = state["cuda"]
        if cuda and torch.cuda.is_available():
            # states written before held one per visible device: this process's, if it is there
            here = torch.cuda.current_device()
            torch.cuda.set_rng_state(cuda[here] if here < len(cuda) else cuda[0])


# Entries state.pt must hold when the run needs them, and what their absence means. Any other
# entry a file lacks (added by a later brats version) leaves its object as initialised.
ENDED = ("fold_state", "best", "best_ema")  # what a finished fold's state keeps
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


def load_resume_state(path: str | Path, objects: dict[str, Stateful]) -> dict[str, Any]:
    """Restore each object from its entry in state.pt (older layouts upgraded first); returns the
    file's other entries (the settings and patients it was written for). A state that lacks what
    exact resume needs, or whose entries do not fit, is refused in one line: resuming from it
    would end on other weights than an uninterrupted run. A finished fold's state holds how it
    ended only."""
    fix = "delete it to start the fold over, or resume with the settings it was written with"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text would advise unpickling: never for this file
        raise BratsError(f"{path}: damaged, or not a resume state (it does not load as one): {fix}") from e
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BratsError(f"{path}: cannot read the resume state ({type(e).__name__}: {first}): {fix}") from e
    if not isinstance(blob, dict):
        raise BratsError(f"{path}: not a resume state (it holds a {type(blob).__name__}): {fix}")
    blob = _upgrade(blob)
    fold_state = blob.get("fold_state")
    finished = isinstance(fold_state, dict) and fold_state.get("finished") is True
    needed = [n for n in objects if n in ENDED or not finished]
    missing = [n for n in needed if blob.get(n) is None]
    if missing:
        hints = [_MISSING_HINT[n] for n in missing if n in _MISSING_HINT]
        why = f" ({'; '.join(hints)})" if hints else ""
        raise BratsError(f"{path}: lacks {', '.join(missing)}, which an exact resume needs{why}: {fix}")
    for name, obj in objects.items():
        if blob.get(name) is None:
            continue
        try:
            obj.load_state_dict(blob[name])
        except Exception as e:  # a list, a string, a tensor of the wrong shape, epoch "abc"...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise BratsError(
                f"{path}: its {name} does not fit this run ({type(e).__name__}: {first}): {fix}"
            ) from e
    return {k: v for k, v in blob.items() if k not in objects}
