"""Checkpoints that can be trusted: atomic writes, plain contents, an explicit selection policy.

A checkpoint holds tensors and plain Python values only (the config as a dict, never a pickled
Namespace), so `torch.load(weights_only=True)` reads it. The selection policy (seed 3.5 / 6.6):
best_ema.pt when the run used EMA and the file exists, else best.pt, else an error; never the
resume state.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from brats.atomic import write_atomic
from brats.errors import BratsError
from brats.runs import BEST, BEST_EMA, STATE

log = logging.getLogger(__name__)

REQUIRED = ("model_state_dict", "val_metrics")


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
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise BratsError(f"{path}: checkpoint lacks {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    return ckpt


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
