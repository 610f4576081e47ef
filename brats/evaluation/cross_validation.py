"""Re-score every fold's checkpoint by the explicit policy, verify it, write the CV report.

Each number in the report is traceable to one named checkpoint (RECIPE.md 2.5 / 3.5 / 6.6): the file is
chosen by the policy (best_ema.pt when the run used EMA, else best.pt, never the resume state),
loaded weights-only, re-scored in fp32 on the fold's patients from splits.json, and its
re-computed val AUC is checked against the AUC stored when it was saved.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from brats.data.cache_reader import open_data
from brats.data.folds import load_or_make_splits, optimistic, protocol
from brats.deploy.contract import Decision
from brats.errors import BratsError
from brats.evaluation.calibration import METHODS, decide, parse_rule
from brats.evaluation.confound import site_confound
from brats.evaluation.metrics import METRICS, bootstrap_auc_ci, mean_std
from brats.evaluation.plots import reliability_diagram, roc_all_folds, save_plots
from brats.evaluation.report import RELIABILITY, report_markdown
from brats.evaluation.scoring import predict, resolve_device, score
from brats.evaluation.test_set import score_test_set
from brats.evaluation.verification import rescore_precision, verify
from brats.io.atomic import check_output_dir, refuse_inputs, remove_stale_temps, staged, write_csv_atomic
from brats.runs.paths import RunPaths
from brats.runs.reader import check_preprocessing, fold_status, load_best_model, model_config, run_config
from brats.runs.summary import FoldRow, Summary
from brats.training.config import TrainConfig, split_spec
from brats.training.datasets import CachedVolumes

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FoldResult:
    fold: int
    checkpoint: str
    is_ema: bool
    epoch: int
    stored_auc: float
    rescored_auc: float  # on the patients that chose the checkpoint (verification)
    metrics: dict  # on the scored (outer) fold
    patient_ids: list[str]
    labels: np.ndarray
    p_hgg: np.ndarray
    verification: dict = field(default_factory=dict)  # Verification.row()
    status: dict | None = None  # how far the fold trained (runs.reader.fold_status)
    test_p: np.ndarray | None = None  # p(HGG) of the held-out test set (splits.test order)


def evaluate_fold(
    run: Path,
    k: int,
    run_cfg: dict,
    cached,
    splits,
    trust: bool,
    strict: bool,
    device: torch.device,
    batch: int,
) -> FoldResult:
    model, ckpt, path = load_best_model(run, k, run_cfg, trust)
    check_preprocessing(cached, ckpt.preprocess, path)
    model.to(device)
    stored, epoch, is_ema = ckpt.val_auc, ckpt.epoch, ckpt.is_ema
    log.info(
        f"fold {k}: {'EMA' if is_ema else 'regular'} checkpoint {path} "
        f"(epoch {epoch}, {'the last' if run_cfg.get('select') == 'last' else 'the best val AUC'}, "
        f"stored val AUC {stored:.4f})"
    )

    fp = ckpt.splits_fingerprint
    if fp is None:
        log.warning(f"{path}: no splits fingerprint stored; assuming {RunPaths(run).splits}")
    elif fp != splits.fingerprint:
        raise BratsError(
            f"{path}: trained on splits {fp}, but {RunPaths(run).splits} is for cohort {splits.fingerprint}: "
            "evaluate with the splits and cache the run was trained on"
        )

    fold = splits.fold(k, cached.patient_ids, cached.labels.tolist())
    modalities = tuple(model_config(ckpt, run_cfg)["modalities"])
    precision = rescore_precision(ckpt.mixed_precision, device)

    def rescore(patients: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
        ds = CachedVolumes(cached, cached.indices(patients), modalities)
        logits, y = predict(model, DataLoader(ds, batch_size=batch, shuffle=False), precision=precision)
        metrics, p_hgg = score(logits, y)
        return metrics, y, p_hgg

    scored, y, p_hgg = rescore(fold.test)
    test_p = rescore(splits.test)[2] if splits.test else None
    chosen, _, chosen_p = (scored, y, p_hgg) if fold.val == fold.test else rescore(fold.val)
    check = verify(ckpt, dict(zip(fold.val, chosen_p)), chosen["auc"], precision)
    msg = f"fold {k}: {check.text} ({path})"
    if not check.ok:
        if strict:
            raise BratsError(msg + " (--strict)")
        log.warning(msg)
    else:
        log.info(msg)
    return FoldResult(
        fold=k,
        checkpoint=str(path),
        is_ema=is_ema,
        epoch=epoch,
        stored_auc=stored,
        rescored_auc=chosen["auc"],
        metrics=scored,
        patient_ids=fold.test,
        labels=y,
        p_hgg=p_hgg,
        verification=check.row(),
        status=fold_status(run, k),
        test_p=test_p,
    )


def summary_arrays(results: list[FoldResult]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and p(HGG) of every scored patient, pooled over the folds in fold order."""
    return np.concatenate([r.labels for r in results]), np.concatenate([r.p_hgg for r in results])


def summarize_folds(
    results: list[FoldResult], run: Path, inner_val: float, seed: int = 0, select: str = "best"
) -> Summary:
    """Table 1 (per fold), mean +- sample std, pooled out-of-fold AUC with a bootstrap CI."""
    table = [
        FoldRow(
            fold=r.fold,
            best_epoch=r.epoch,
            checkpoint=Path(r.checkpoint).name,
            is_ema=r.is_ema,
            stored_val_auc=r.stored_auc,
            rescored_val_auc=r.rescored_auc,
            metrics={m: r.metrics[m] for m in METRICS},
            n=len(r.labels),
            **r.verification,
            finished=r.status["finished"] if r.status else None,
            epochs_trained=r.status["epochs"] if r.status else None,
        )
        for r in results
    ]
    mean_and_std = {
        m: dict(zip(("mean", "std"), mean_std([row.metrics[m] for row in table]))) for m in METRICS
    }
    labels, p = summary_arrays(results)
    pooled = {"n": int(len(labels)), "hgg": int(labels.sum()), "lgg": int(len(labels) - labels.sum())}
    pooled["majority_class_accuracy"] = max(pooled["hgg"], pooled["lgg"]) / max(pooled["n"], 1)
    if len(np.unique(labels)) == 2:
        pooled["auc"] = float(roc_auc_score(labels, p))
        lo, hi = bootstrap_auc_ci(labels, p, seed=seed)
        pooled["auc_ci95"] = [lo, hi]
    return Summary(
        run=str(run),
        protocol=protocol(inner_val, select),
        optimistic=optimistic(inner_val, select),
        folds=table,
        mean_std=mean_and_std,
        pooled=pooled,
    )


def evaluate_run(
    run: str | Path,
    folds: list[int] | None = None,
    strict: bool = False,
    trust: bool = False,
    data: str | None = None,
    device: str | None = None,
    batch: int = 4,
    calibrate: str = "none",
    threshold: str = "0.5",
    force_calibration: bool = False,
) -> Summary:
    """Evaluate `folds` (default: all K) of a run; writes RUN/evaluation/; returns the summary.
    `calibrate` and `threshold` choose the decision fitted on the pooled out-of-fold predictions
    (brats.evaluation.calibration; a calibration that makes the cross-fitted Brier score or log
    loss worse is not kept unless `force_calibration`)."""
    if calibrate not in METHODS:
        raise BratsError(f"--calibrate {calibrate!r}: choose one of {', '.join(METHODS)}")
    parse_rule(threshold)
    run = Path(run)
    paths = RunPaths(run)
    run_cfg = run_config(run)
    cfg = TrainConfig.from_dict(run_cfg)
    k_all = list(range(cfg.folds))
    wanted = k_all if folds is None else sorted(set(folds))
    bad = [k for k in wanted if k not in k_all]
    if bad:
        raise BratsError(f"--fold {bad}: this run has folds 0..{cfg.folds - 1}")
    missing = [k for k in wanted if not paths.fold(k).is_dir()]
    if missing:
        raise BratsError(
            f"{run}: fold(s) {', '.join(map(str, missing))} not trained; "
            "train them or leave them out with --fold"
        )
    dev = resolve_device(device)
    out = check_outputs(paths, wanted, Path(data or cfg.data))
    cached = open_data(data or cfg.data, cfg.size)
    ids, labels = cached.patient_ids, cached.labels.tolist()
    # made again from the cohort and the seed if missing, but never written: evaluation must not
    # leave a run with splits of another cohort
    splits = load_or_make_splits(
        paths.splits, ids, labels, write=False, groups=cached.collections, **split_spec(cfg)
    )
    results = [evaluate_fold(run, k, run_cfg, cached, splits, trust, strict, dev, batch) for k in wanted]

    summary = dataclasses.replace(
        summarize_folds(results, run, cfg.inner_val, select=cfg.select),
        **decisions(results, cached, splits, cfg, calibrate, threshold, force_calibration),
    )
    summary = dataclasses.replace(summary, warnings=result_warnings(summary, cfg))
    for w in summary.warnings:
        log.warning(w)
    write_evaluation(out, paths, summary, results, splits.test)
    return summary


SMALL = 10  # patients of a grade: fewer, and the figures' CIs mean little


def result_warnings(summary: Summary, cfg: TrainConfig) -> list[str]:
    """What makes these figures mean less than they seem: said in the log and the report."""
    out = []
    pooled = summary.pooled
    if min(pooled["hgg"], pooled["lgg"]) < SMALL:
        out.append(
            f"only {pooled['n']} patients were scored ({pooled['hgg']} HGG, {pooled['lgg']} LGG): too few "
            f"for the AUC and its CI to mean much (below {SMALL} of a grade, a bootstrap mostly redraws the "
            "same few patients); treat every figure here as a smoke test"
        )
    if cfg.schedule_warning():
        out.append(cfg.schedule_warning())
    refused = (summary.calibration or {}).get("not_shipped", {})
    if "reason" in refused:
        out.append(f"--calibrate {refused['method']} was refused: {refused['reason']}")
    return out


def decisions(
    results: list[FoldResult],
    cached,
    splits,
    cfg: TrainConfig,
    calibrate: str,
    threshold: str,
    force: bool,
) -> dict:
    """The summary's decision fields: the decision fitted on the pooled out-of-fold predictions
    (with the figures that judge it), the site confound, and with a test set the test set's
    figures and the ensemble's own decision."""
    labels, p_oof = summary_arrays(results)
    folds_of = np.concatenate([np.full(len(r.labels), r.fold) for r in results])
    decision, calibration = decide(labels, p_oof, folds_of, calibrate, threshold, force)
    calibration["balanced_sampler"] = cfg.sampler == "inverse_freq"
    collection = dict(zip(cached.patient_ids, cached.collections))
    scored = [p for r in results for p in r.patient_ids]
    fields = {
        "calibration": calibration,
        "decision": decision.to_dict(),
        "confound": site_confound([collection[p] for p in scored], labels, p_oof),
    }
    if splits.test:
        y_test = cached.labels[cached.indices(splits.test)]
        fold_p = {r.fold: r.test_p for r in results}
        test_set, ensemble = score_test_set(
            splits.test, y_test, fold_p, decision, calibrate, threshold, force
        )
        fields.update(test_set=test_set, ensemble_decision=ensemble.to_dict())
    return fields


def write_evaluation(
    out: Path, paths: RunPaths, summary: Summary, results: list[FoldResult], test_ids: list[str]
) -> None:
    """RUN/evaluation/, all files at once (staged): plots, the per-patient predictions (of the
    test set too, when there is one), summary.json and report.md."""
    decision = Decision.from_dict(summary.decision, paths.summary, "rerun evaluate.py")
    rows = [
        {"patient_id": p, "fold": r.fold, "label": int(y), "p_hgg": float(prob)}
        for r in results
        for p, y, prob in zip(r.patient_ids, r.labels, r.p_hgg)
    ]
    _, p_oof = summary_arrays(results)
    for row, p_cal in zip(rows, decision.calibrate(p_oof)):
        row["p_hgg_calibrated"] = float(p_cal)
    calibration = summary.calibration
    with staged(out) as stage:
        for r in results:
            title = f"fold {r.fold} epoch {r.epoch}"
            save_plots(stage / RunPaths.fold_name(r.fold), r.labels, r.p_hgg, title=title, decision=decision)
        roc_all_folds({r.fold: (r.labels, r.p_hgg) for r in results}, stage / paths.roc_all_folds.name)
        curves = {"raw": calibration["raw"]}
        if "calibrated" in calibration:
            curves[f"{decision.calibration}, cross-fitted"] = calibration["calibrated"]
        elif "reliability" in calibration.get("not_shipped", {}).get("cross_fitted", {}):
            dropped = calibration["not_shipped"]
            curves[f"{dropped['method']}, cross-fitted, not kept"] = dropped["cross_fitted"]
        reliability_diagram(stage / RELIABILITY, curves)
        write_csv_atomic(stage / paths.predictions.name, rows)
        if summary.test_set:
            write_csv_atomic(stage / paths.test_predictions.name, test_rows(summary, results, test_ids))
        summary.write(stage / paths.summary.name)
        (stage / paths.report.name).write_text(report_markdown(summary, run=Path(summary.run)))


def test_rows(summary: Summary, results: list[FoldResult], test_ids: list[str]) -> list[dict]:
    """One row per test patient: its grade, each fold model's p(HGG), the ensemble's, and the
    ensemble's p(HGG) under its own decision's calibration."""
    ensemble = summary.test_set["ensemble"]
    decision = Decision.from_dict(summary.ensemble_decision, Path(summary.run), "rerun evaluate.py")
    rows = []
    for i, p in enumerate(test_ids):
        row = {"patient_id": p, "label": summary.test_set["labels"][i]}
        row.update({f"p_hgg_fold_{r.fold}": float(r.test_p[i]) for r in results})
        row["p_hgg_ensemble"] = ensemble["p_hgg"][i]
        row["p_hgg_ensemble_calibrated"] = float(decision.calibrate(np.array([ensemble["p_hgg"][i]]))[0])
        rows.append(row)
    return rows


def check_outputs(paths: RunPaths, folds: list[int], cache: Path) -> Path:
    """RUN/evaluation can be written, before any scoring: a folder (created if missing) that is
    not (through a link) the run, one of its folds or the cache, and whose files and plot folders
    are not in the way; temp files of a killed evaluation are removed."""
    out = paths.evaluation
    if out.exists() and not out.is_dir():
        raise BratsError(f"{out} is a file, where the evaluation writes its results: move it away")
    protected = {
        paths.root: "the run folder",
        cache: "the cache",
        **{paths.fold(k): f"fold {k}" for k in paths.folds()},
    }
    refuse_inputs(out, protected, "the evaluation folder")
    check_output_dir(out, "evaluation results")
    remove_stale_temps(out)
    for f in (
        paths.summary,
        paths.report,
        paths.predictions,
        paths.test_predictions,
        paths.roc_all_folds,
        out / RELIABILITY,
    ):
        if f.is_dir():
            raise BratsError(f"{f} is a folder, where the evaluation writes a file: move it away")
    for k in folds:
        if (out / RunPaths.fold_name(k)).exists() and not (out / RunPaths.fold_name(k)).is_dir():
            raise BratsError(
                f"{out / f'fold_{k}'} is a file, where the evaluation writes plots: move it away"
            )
    return out
