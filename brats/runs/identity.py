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
from typing import Any

from brats.data.preprocess import PreprocessConfig
from brats.errors import BratsError
from brats.io.atomic import read_json_object, write_json_atomic
from brats.runs.paths import RunPaths
from brats.training.config import TrainConfig, make_config

# Settings that may differ between the folds of one run without making them incomparable.
# Speed settings change no result on the CPU and only float noise on a GPU.
PER_PROCESS = (
    "fold",
    "resume",
    "workers",
    "progress",
    "cpu",
    "mixed_precision",
    "data",
    "extra",
    "report_to",
)


SPEED = ("cache_device", "val_batch_size", "channels_last", "compile", "compile_backend", "deterministic")


def comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in PER_PROCESS + SPEED}


# Settings that say where a run lies rather than what it is: a run copied or moved elsewhere, or
# named by another path to the same folder, is the same run. The data's identity is its cohort,
# which splits.json fingerprints (load_or_make_splits refuses another cohort).
LOCATION = ("run", "data")


def setting_differences(old: dict, new: dict) -> list[str]:
    """ "name: old -> new" for each setting in which two configs of one run may not differ.
    Fields added by a later brats version take their defaults, so an older run still matches."""
    old, new = TrainConfig.from_dict(old).to_dict(), TrainConfig.from_dict(new).to_dict()
    keys = (set(comparable(old)) | set(comparable(new))) - set(LOCATION)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(keys) if old.get(k) != new.get(k)]


def check_run_config(run: Path, cfg: TrainConfig) -> bool:
    """Whether RUN/config.json exists; when it does, every fold of the run must share its settings."""
    path = RunPaths(run).config
    if not path.exists():
        return False
    try:
        diff = setting_differences(read_json_object(path), cfg.to_dict())
    except (ValueError, TypeError, AttributeError) as e:
        raise BratsError(
            f"{path} is damaged ({str(e)[:120]}): restore it, or delete it to write it again"
        ) from e
    if diff:
        raise BratsError(
            f"{path}: this run was started with other settings ({', '.join(diff[:4])}); "
            "use a new --run folder so that the folds of one run stay comparable"
        )
    return True


def write_run_config(run: Path, cfg: TrainConfig) -> None:
    """RUN/config.json: the resolved config, written when missing (after a resume state, if any,
    has agreed to the settings: a refused resume must not leave its settings behind)."""
    if not check_run_config(run, cfg):
        write_json_atomic(RunPaths(run).config, cfg.to_dict())


def check_run_preprocess(run: Path, preprocess: dict) -> None:
    """RUN/preprocess.json: every fold of a run trains on a cache preprocessed one way. A cache
    prepared again at another size after some folds trained is refused for the others."""
    path = RunPaths(run).preprocess
    if not path.exists():
        write_json_atomic(path, preprocess)
        return
    try:
        stored = json.loads(path.read_text())
        diffs = PreprocessConfig.differences(stored, preprocess)
        if stored.get("modalities") != preprocess.get("modalities"):
            diffs.append(("modalities", stored.get("modalities"), preprocess.get("modalities")))
    except (ValueError, AttributeError) as e:
        raise BratsError(
            f"{path} is damaged ({e}): restore it, or delete it if the cache is the one trained on"
        ) from e
    if diffs:
        shown = ", ".join(f"{name} {a} -> {b}" for name, a, b in diffs)
        raise BratsError(
            f"{path}: the run's folds trained on a cache preprocessed otherwise ({shown}): give --data the "
            "cache they trained on, or train in a new --run folder"
        )


def check_resume(extra: dict[str, Any], cfg: TrainConfig, fold: int, patients: str, path: Path) -> None:
    """A resume state is continued only by the run, fold and patients it was written for: after
    config.json was deleted, a changed learning rate would otherwise resume silently."""
    fix = "resume with the settings it was written with, or train the fold again in a new --run folder"
    stored = extra.get("config")
    try:
        diff = setting_differences(stored, cfg.to_dict()) if isinstance(stored, dict) else []
    except (TypeError, ValueError) as e:
        raise BratsError(f"{path}: its stored settings are damaged ({e}): {fix}") from e
    if diff:
        raise BratsError(f"{path} was written with other settings ({', '.join(diff[:4])}): {fix}")
    if extra.get("fold", fold) != fold:
        raise BratsError(f"{path} is fold {extra['fold']}'s resume state, not fold {fold}'s: {fix}")
    if extra.get("patients_fingerprint", patients) != patients:
        raise BratsError(f"{path} was written for other patients than splits.json gives fold {fold}: {fix}")


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


# train.py option names that are not the setting's name in kebab case
OPTION_NAMES = {"folds": "--k-folds"}
NO_RESULT = PER_PROCESS + SPEED + LOCATION + ("policy", "state_every")
NO_OPTION = ("ldam_max_m", "ldam_s")  # set in code only: train.py has no option for them


def recipe_flags(d: dict) -> list[str]:
    """The train.py options that turn the run's policy defaults into its settings: with
    `--policy` they retrain it (settings that change no result, and where it lies, left out)."""
    cfg = TrainConfig.from_dict(d)
    base = make_config(cfg.policy, data=cfg.data or "-")
    if cfg.pretrained:  # --pretrained brings its layout: another one must be said
        base = dataclasses.replace(base, layout="medicalnet")
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in NO_RESULT + NO_OPTION or value == getattr(base, f.name):
            continue
        name = OPTION_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(value, bool):
            flags.append(name if value else name.replace("--", "--no-", 1))
        elif isinstance(value, tuple):
            flags += [name, ",".join(value)]
        else:
            flags += [name, repr(value) if isinstance(value, float) else str(value)]
    return flags
