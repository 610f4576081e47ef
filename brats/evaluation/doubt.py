"""The model's own doubt, measured on the cohort at export: how far a patient's features may lie
from the training patients', and how much the fold models may disagree, before predict flags it.

For each fold model: its pooled features (the classifier's input) for every cohort patient; a
FeatureReference fitted on the fold's training patients; the distance of the fold's out-of-fold
patients to it. The threshold is the `QUANTILE` of those out-of-fold distances, so that about 2%
of patients the models never trained on are flagged. A new patient's distance is the mean of the
fold models' distances, each comparable with its own out-of-fold patients' (the mean varies less
than one fold's, so it flags a little less often than 2%). The disagreement is the range of the
fold models' p(HGG); its threshold is the same quantile over the cohort's patients, each of whom
4 of 5 folds trained on: a new patient is compared with patients the ensemble has seen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from brats.data.cache_reader import CachedCohort, channel_indices, load_volume
from brats.data.folds import stored_fold
from brats.errors import BratsError
from brats.models.explained import HGG, FeatureReference
from brats.models.resnet import ResNet3D
from brats.runs.paths import RunPaths

log = logging.getLogger(__name__)

QUANTILE = 0.98  # of the out-of-fold patients' distances (and the cohort's spreads) not flagged


@torch.no_grad()
def cohort_outputs(
    models: list[ResNet3D], cached: CachedCohort, modalities: list[str], batch: int = 4
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per model, (N, F) pooled features and (N,) p(HGG) of every cached patient (eval, fp32);
    each volume is read and checked once, for all the models."""
    channels = channel_indices(cached, modalities)
    features, p_hgg = [[] for _ in models], [[] for _ in models]
    for model in models:
        model.eval()
    for start in range(0, len(cached), batch):
        volumes = [load_volume(cached, i)[channels] for i in range(start, min(start + batch, len(cached)))]
        x = torch.from_numpy(np.stack(volumes).astype(np.float32))
        for m, model in enumerate(models):
            pooled = model.feature_maps(x).mean(dim=(2, 3, 4))
            features[m].append(pooled.double().numpy())
            p_hgg[m].append(torch.softmax(model.fc(pooled), dim=1)[:, HGG].double().numpy())
    return [(np.concatenate(f), np.concatenate(p)) for f, p in zip(features, p_hgg)]


def fit_doubt(
    models: list[ResNet3D], folds: list[int], run: Path, cached: CachedCohort, modalities: list[str]
) -> tuple[list[FeatureReference], dict]:
    """Each fold model's FeatureReference, and the thresholds for the contract's "doubt"."""
    paths = RunPaths(run)
    position = {p: i for i, p in enumerate(cached.patient_ids)}
    references, oof, p_folds = [], [], []
    stored = [stored_fold(paths.splits, k) for k in folds]
    for k, fold in zip(folds, stored):
        if fold is None:
            raise BratsError(
                f"{paths.splits}: holds no inner validation lists: cannot tell fold {k}'s training patients"
            )
    log.info(f"folds {folds}: features of {len(cached)} patients for the out-of-distribution reference")
    for fold, (features, p_hgg) in zip(stored, cohort_outputs(models, cached, modalities)):
        train = [position[p] for p in fold.train if p in position]
        test = [position[p] for p in fold.test if p in position]
        reference = FeatureReference.fit(torch.from_numpy(features[train]))
        references.append(reference)
        oof.append(reference(torch.from_numpy(features[test]).float()).double().numpy())
        p_folds.append(p_hgg)
    distances = np.sort(np.concatenate(oof))
    doubt = {
        "quantile": QUANTILE,
        "distance_threshold": float(np.quantile(distances, QUANTILE)),
        "oof_distances": [round(float(d), 5) for d in distances],
    }
    if len(models) > 1:
        stacked = np.stack(p_folds)
        spreads = np.sort(np.ptp(stacked, axis=0))
        doubt["spread_threshold"] = float(np.quantile(spreads, QUANTILE))
        doubt["cohort_spreads"] = [round(float(s), 5) for s in spreads]
        # how far the fold models' logits lie apart per patient: the risk that a decision fitted on
        # single-fold predictions does not transfer to their average
        clipped = np.clip(stacked, 1e-7, 1 - 1e-7)
        sd = np.std(np.log(clipped / (1 - clipped)), axis=0, ddof=1)
        doubt["fold_logit_sd"] = {"median": float(np.median(sd)), "q90": float(np.quantile(sd, 0.9))}
    return references, doubt
