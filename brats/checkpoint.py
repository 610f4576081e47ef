"""Checkpoints that can be trusted: one schema, atomic writes, plain contents, an explicit policy.

A checkpoint holds tensors and plain Python values only (the config as a dict, never a pickled
Namespace), so `torch.load(weights_only=True)` reads it. `Checkpoint` is its one schema: every
writer builds one and every reader gets one, with the defaults for fields older files lack
decided here once. `BestKeeper` owns one best file (best.pt or best_ema.pt) and the rule that
replaces it. The resume state (state.pt) is a dict of objects with `state_dict()` /
`load_state_dict()`, written and read by `save_resume_state` / `load_resume_state`.

The selection policy (seed 3.5 / 6.6): best_ema.pt when the run used EMA and the file exists,
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

import numpy as np
import torch

from brats.atomic import write_atomic
from brats.errors import BratsError
from brats.metrics import save_plots
from brats.runs import BEST, BEST_EMA, STATE

log = logging.getLogger(__name__)

REQUIRED = ("model_state_dict", "val_metrics")
# A new best must beat the old one by more than float noise: the same ranking can give AUCs that
# differ in the last bits, which must not count as an improvement.
AUC_EPS = 1e-9


@dataclass(frozen=True)
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
    under weights_only=True (seed 3.6). `trust` (the --trust-checkpoints flag) allows the full
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
    """The seed's explicit policy: best_ema.pt (EMA on and present), else best.pt, else error."""
    fold_dir = Path(fold_dir)
    if ema_enabled and (fold_dir / BEST_EMA).exists():
        return fold_dir / BEST_EMA
    if (fold_dir / BEST).exists():
        return fold_dir / BEST
    raise BratsError(
        f"{fold_dir}: no {BEST}{' or ' + BEST_EMA if ema_enabled else ''} (never falling back to {STATE}); "
        "train this fold first"
    )


class BestKeeper:
    """One best checkpoint file: replaced only when the validation AUC beats the best so far by
    more than `AUC_EPS` (NaN never does), or ties it at a lower validation loss; written
    atomically. `plot` draws the ROC, PR and confusion plots of the best epoch once the fold is
    done (drawing them at every new best cost ~0.5 s each time, for plots the next replaced).

    `consider` runs on every process (so that all agree on early stopping); `save` and `plot`
    write, on the main process only. The best AUC and epoch, and the labels and probabilities
    the plots are drawn from, are part of the resume state.
    """

    def __init__(self, path: Path, is_ema: bool, title: str, last: bool = False):
        self.path, self.is_ema, self.title = Path(path), is_ema, title
        self.last = last  # keep every epoch in turn: the file ends with the fold's last epoch
        self.plot_prefix = "ema_" if is_ema else ""
        self.best_auc, self.best_loss, self.best_epoch = -math.inf, math.inf, 0
        self.labels: list[int] = []  # the best epoch's validation labels and p(HGG), for `plot`
        self.p_hgg: list[float] = []

    def consider(self, auc: float, epoch: int, loss: float = math.inf) -> bool:
        """Record `epoch` if it is a new best: a higher AUC, or the same AUC at a lower validation
        loss. Returns whether it is. The tie-break matters on small validation folds, whose AUC
        takes few values and often reaches 1.0 within a few epochs: without it the first epoch
        to reach the top is kept, a barely trained model whose probabilities are bunched."""
        if self.last:
            self.best_auc, self.best_loss, self.best_epoch = auc, loss, epoch
            return True
        higher = auc > self.best_auc + AUC_EPS
        tied = abs(auc - self.best_auc) <= AUC_EPS and loss < self.best_loss
        if not (higher or tied):
            return False
        self.best_auc, self.best_loss, self.best_epoch = auc, loss, epoch
        return True

    def save(self, ckpt: Checkpoint, labels: np.ndarray, p_hgg: np.ndarray) -> None:
        """Write the new best; remember what its plots are drawn from."""
        save_atomic(ckpt.to_payload(), self.path)
        self.labels, self.p_hgg = [int(v) for v in labels], [float(v) for v in p_hgg]

    def plot(self) -> None:
        """Replace earlier plots of this checkpoint with those of its best epoch."""
        if not self.labels:  # no best yet, or resumed from a state.pt written before they were kept
            return
        folder = self.path.parent
        for old in folder.glob(f"{self.plot_prefix}*_epoch_*.png"):
            if self.is_ema or not old.name.startswith("ema_"):
                old.unlink()
        suffix, title = f"_epoch_{self.best_epoch}", f"{self.title} epoch {self.best_epoch}"
        labels, p_hgg = np.asarray(self.labels), np.asarray(self.p_hgg)
        save_plots(folder, labels, p_hgg, prefix=self.plot_prefix, suffix=suffix, title=title)

    def state_dict(self) -> dict[str, Any]:
        best = {"best_auc": self.best_auc, "best_loss": self.best_loss, "best_epoch": self.best_epoch}
        return {**best, "labels": self.labels, "p_hgg": self.p_hgg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_auc = float(state.get("best_auc", -math.inf))
        # a state written before the tie-break: its best was kept on ties, so a tie keeps it now
        self.best_loss = float(state.get("best_loss", -math.inf))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.labels, self.p_hgg = list(state.get("labels", [])), list(state.get("p_hgg", []))


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
