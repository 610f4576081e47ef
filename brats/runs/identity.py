"""What makes a run one run: the settings every fold shares, and the ones that may differ.

A run folder's config.json holds the resolved TrainConfig; every fold trained into the folder
must match it, except in the settings that say where the run lies (a run copied or moved, or
named by another path, is the same run) and those that change no result (per-process and speed
settings: no change on the CPU, float noise on a GPU). Folds trained in one process share one
Accelerator, so they must match in everything but the fold.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from brats.errors import BratsError
from brats.io.atomic import write_json_atomic
from brats.runs.paths import RunPaths
from brats.training.config import TrainConfig

# Settings that may differ between the folds of one run without making them incomparable.
# Speed settings change no result on the CPU and only float noise on a GPU.
PER_PROCESS = ("fold", "resume", "workers", "progress", "cpu", "mixed_precision", "data", "extra")


SPEED = ("cache_device", "val_batch_size", "channels_last", "compile", "deterministic")


def comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in PER_PROCESS + SPEED}


# Settings that say where a run lies rather than what it is: a run copied or moved elsewhere, or
# named by another path to the same folder, is the same run. The data's identity is its cohort,
# which splits.json fingerprints (load_or_make_splits refuses another cohort).
LOCATION = ("run", "data")


def write_run_config(run: Path, cfg: TrainConfig) -> None:
    """RUN/config.json: the resolved config; every fold of a run must share its settings."""
    path = RunPaths(run).config
    d = cfg.to_dict()
    if path.exists():
        # Fields added by a later brats version take their defaults, so an older run still matches.
        old = TrainConfig.from_dict(json.loads(path.read_text())).to_dict()
        keys = (set(comparable(old)) | set(comparable(d))) - set(LOCATION)
        diff = sorted(k for k in keys if old.get(k) != d.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {d.get(k)!r}" for k in diff[:4])
            raise BratsError(
                f"{path}: this run was started with other settings ({shown}); "
                "use a new --run folder so that the folds of one run stay comparable"
            )
        return
    write_json_atomic(path, d)


def check_one_run(cfgs: list[TrainConfig]) -> None:
    """Folds trained in one process share one Accelerator: their settings must be equal."""
    if not cfgs:
        raise BratsError("no fold to train: give --fold 1, --fold 0,2,4 or --fold all")
    first = dataclasses.replace(cfgs[0], fold=0)
    if any(dataclasses.replace(c, fold=0) != first for c in cfgs[1:]):
        raise BratsError("folds trained in one process must share every setting but --fold")
    folds = [c.fold for c in cfgs]
    if len(set(folds)) != len(folds):
        raise BratsError(f"--fold {','.join(map(str, folds))}: a fold is given twice")
