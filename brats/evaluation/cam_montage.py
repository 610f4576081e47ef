"""evaluate.py --cam: each fold's most confident right and wrong patients with its model's CAM."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from brats.data.cache_reader import open_data
from brats.data.cohort import CLASSES
from brats.errors import BratsError
from brats.evaluation.plots import write_cam_montage
from brats.evaluation.scoring import resolve_device
from brats.models.explained import explain
from brats.runs.paths import RunPaths
from brats.runs.reader import check_preprocessing, load_best_model, model_config, run_config
from brats.training.config import TrainConfig
from brats.training.datasets import CachedVolumes


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
        p_hgg, cams = explain([model.to(dev)], volumes)
        write_cam_montage(volumes[:, underlay], cams, p_hgg, titles, paths.cam_montage(k))
        written.append(paths.cam_montage(k))
    return written
