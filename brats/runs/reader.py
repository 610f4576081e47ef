"""Reading a run folder: its config, its evaluation summary, and each fold's model by the policy.

Every command that reads a run (evaluate, export, the ablation table, CAM montages) goes through
here, so that what makes a run readable is decided once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from brats.data.cache_reader import CachedCohort
from brats.data.folds import stored_fold
from brats.data.preprocess import PreprocessConfig
from brats.errors import BratsError
from brats.io.atomic import read_json_object
from brats.models.resnet import build_model
from brats.runs.checkpoint import Checkpoint, read_checkpoint, select_checkpoint
from brats.runs.paths import RunPaths
from brats.runs.summary import Summary
from brats.training.config import TrainConfig, validate

log = logging.getLogger(__name__)


def run_config(run: Path) -> dict:
    """RUN/config.json as a dict, checked: it must describe a valid TrainConfig."""
    path = RunPaths(run).config
    if not path.is_file():
        raise BratsError(f"{run}: no {path.name}: is this a run folder made by train.py?")

    def corrupt(e: Exception) -> BratsError:
        return BratsError(
            f"{path} is corrupt ({str(e)[:160]}): restore it, or delete it and rerun train.py --resume "
            "with the options the run was trained with (train.py writes it again)"
        )

    try:
        cfg = read_json_object(path)  # an unreadable file is its own line
    except ValueError as e:
        raise corrupt(e) from e
    try:
        validate(TrainConfig.from_dict(cfg))
    except (ValueError, TypeError, BratsError) as e:
        raise corrupt(e) from e
    return cfg


def load_summary(run: Path) -> Summary:
    """RUN/evaluation/summary.json through its schema (missing or damaged: one line with the fix)."""
    return Summary.read(RunPaths(run).summary, f"run python evaluate.py --run {run} to write it")


def check_preprocessing(cached: CachedCohort, stored: dict | None, path: Path) -> None:
    """Refuse to use the checkpoint at `path` (trained on preprocessing `stored`) on a cache
    preprocessed otherwise, e.g. prepared again at another --size after training: the model would
    still run, and its numbers would be wrong."""
    if not isinstance(stored, dict):
        log.warning(f"{path}: no preprocessing stored; cannot check it against {cached.root}")
        return
    diffs = PreprocessConfig.differences(cached.preprocess, stored)
    if diffs:
        cache_side = ", ".join(f"{name} {a}" for name, a, _ in diffs)
        ckpt_side = ", ".join(f"{name} {b}" for name, _, b in diffs)
        size = stored.get("size")
        raise BratsError(
            f"{cached.root} is preprocessed with {cache_side} but {path} was trained on {ckpt_side}: "
            f"give the cache it was trained on with --data, or prepare one with "
            f"python -m brats.prepare RAW_DATA --out NEW_CACHE --size {size}"
        )


def model_config(ckpt: Checkpoint, run_cfg: dict) -> dict:
    """The checkpoint's own config when it has one (a plain dict), else the run's."""
    cfg = ckpt.config
    return cfg if isinstance(cfg, dict) else run_cfg


def fold_status(run: Path, k: int) -> dict | None:
    """How far fold k got ({"epochs", "finished", "stop_reason"}): from the resume state's
    fold_state (memory-mapped: the weights are not read), which training writes and reads back;
    its status.json when there is no readable state; None when neither tells."""
    paths = RunPaths(run)
    if not paths.state(k).is_file():
        try:
            status = json.loads(paths.status(k).read_text())
            if isinstance(status, dict) and isinstance(status.get("finished"), bool):
                return status
        except (OSError, ValueError):
            return None
    try:
        blob = torch.load(paths.state(k), map_location="cpu", weights_only=True, mmap=True)
        fold_state = blob["fold_state"]
        finished, epochs = fold_state["finished"], fold_state["epoch"]
    except Exception:  # absent or unreadable: evaluate and export say so, they do not guess
        return None
    if not isinstance(finished, bool) or not isinstance(epochs, int):
        return None
    return {"epochs": epochs, "finished": finished, "stop_reason": str(fold_state.get("stop_reason", ""))}


def check_fold_identity(ckpt: Checkpoint, path: Path, paths: RunPaths, k: int) -> None:
    """A checkpoint is scored as fold k's only if it is fold k's model, trained on the patients
    splits.json gives fold k: a checkpoint copied from another fold, or folds swapped in
    splits.json, would score a model on patients it trained on."""
    if ckpt.fold is not None and ckpt.fold != k:
        raise BratsError(
            f"{path} holds fold {ckpt.fold}'s model, not fold {k}'s (copied from another fold?): "
            f"restore fold {k}'s checkpoint or train the fold again"
        )
    if ckpt.patients_fingerprint is None:
        log.warning(
            f"{path}: written before checkpoints recorded their patients; not checked against {paths.splits}"
        )
        return
    fold = stored_fold(paths.splits, k) if paths.splits.is_file() else None
    if fold is not None and fold.fingerprint != ckpt.patients_fingerprint:
        raise BratsError(
            f"{path} was trained on other patients than {paths.splits} gives fold {k} (the file edited, "
            "or folds swapped?): restore the splits.json the run was trained with"
        )


def load_best_model(
    run: Path, k: int, run_cfg: dict, trust: bool
) -> tuple[torch.nn.Module, Checkpoint, Path]:
    """Fold k's checkpoint chosen by the policy, loaded into a freshly built fp32 model in eval
    mode; returns (model, checkpoint, path)."""
    path = select_checkpoint(RunPaths(run).fold(k), float(run_cfg.get("ema_decay", 0.0)) > 0)
    ckpt = read_checkpoint(path, trust=trust)
    check_fold_identity(ckpt, path, RunPaths(run), k)
    model = build_model(model_config(ckpt, run_cfg))
    try:
        model.load_state_dict(ckpt.model_state_dict)
    except RuntimeError as e:
        raise BratsError(f"{path}: weights do not fit the configured model ({str(e).splitlines()[0]})") from e
    return model.eval().float(), ckpt, path
