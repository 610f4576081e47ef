"""Re-score every fold's checkpoint by the explicit policy, verify it, write the CV report.

Each number in the report is traceable to one named checkpoint (seed 2.5 / 3.5 / 6.6): the file is
chosen by the policy (best_ema.pt when the run used EMA, else best.pt, never the resume state),
loaded weights-only, re-scored in fp32 on the fold's patients from splits.json, and its
re-computed val AUC is checked against the AUC stored when it was saved.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from brats.atomic import (
    check_output_dir,
    fsync_dir,
    remove_stale_temps,
    temp_path,
    write_error,
)
from brats.cache import CachedCohort, open_data
from brats.calibration import METHODS, parse_rule, reliability_diagram, summarize_calibration
from brats.checkpoint import Checkpoint, read_checkpoint, select_checkpoint
from brats.config import TrainConfig, validate
from brats.data import CachedVolumes
from brats.errors import BratsError
from brats.folds import load_or_make_splits, optimistic, protocol
from brats.metrics import METRICS, bootstrap_auc_ci, mean_std, save_plots
from brats.model import build_model
from brats.preprocess import PreprocessConfig
from brats.runs import RunPaths
from brats.scoring import AUTOCAST, predict, score

log = logging.getLogger(__name__)

RELIABILITY = "reliability.png"  # in RUN/evaluation/
AUC_TOLERANCE = 0.01  # seed 3.5: warn when re-scored and stored AUC differ by more
DP_TOLERANCE = 1e-3  # per-patient |p(HGG) stored - re-scored|, same precision
DP_TOLERANCE_CROSS = 0.05  # ... trained in bf16/fp16, re-scored in fp32 (on a CPU)


@dataclass
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


def run_config(run: Path) -> dict:
    """RUN/config.json as a dict, checked: it must describe a valid TrainConfig."""
    path = RunPaths(run).config
    if not path.is_file():
        raise BratsError(f"{run}: no {path.name}: is this a run folder made by train.py?")
    try:
        cfg = json.loads(path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError(f"a JSON {type(cfg).__name__}, not an object")
        validate(TrainConfig.from_dict(cfg))
    except (ValueError, TypeError, BratsError) as e:  # JSONDecodeError is a ValueError
        raise BratsError(
            f"{path} is corrupt ({str(e)[:160]}): restore it, or delete it and rerun train.py --resume "
            "with the options the run was trained with (train.py writes it again)"
        ) from e
    return cfg


def load_summary(run: Path) -> dict:
    """RUN/evaluation/summary.json, checked for what export and the ablation table read."""
    path = RunPaths(run).summary
    if not path.is_file():
        raise BratsError(f"{run}: not evaluated yet (no {path}): run python evaluate.py --run {run}")
    try:
        summary = json.loads(path.read_text())
        rows = summary["folds"]
        if not isinstance(rows, list) or not rows:
            raise ValueError("no folds")
        for row in rows:
            if not isinstance(row["fold"], int):
                raise ValueError(f"fold {row['fold']!r}")
            for m in ("rescored_val_auc", *METRICS):
                float(row[m])
        for m in METRICS:
            float(summary["mean_std"][m]["mean"]), float(summary["mean_std"][m]["std"])
        if not isinstance(summary["pooled"], dict) or not isinstance(summary["protocol"], str):
            raise ValueError("no pooled figures or protocol")
    except (ValueError, TypeError, KeyError) as e:
        raise BratsError(
            f"{path} is corrupt ({type(e).__name__}: {str(e)[:120]}): "
            f"rerun python evaluate.py --run {run} to write it again"
        ) from e
    return summary


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


def resolve_device(device: str | None) -> torch.device:
    """--device as a torch.device that can hold a tensor here; cuda when available by default."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except Exception as e:  # unknown names raise RuntimeError, absent backends other types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BratsError(f"--device {device!r}: not usable here ({first[:120]}): use cpu or cuda") from e
    return dev


def model_config(ckpt: Checkpoint, run_cfg: dict) -> dict:
    """The checkpoint's own config when it has one (a plain dict), else the run's."""
    cfg = ckpt.config
    return cfg if isinstance(cfg, dict) else run_cfg


def load_best_model(
    run: Path, k: int, run_cfg: dict, trust: bool
) -> tuple[torch.nn.Module, Checkpoint, Path]:
    """Fold k's checkpoint chosen by the policy, loaded into a freshly built fp32 model in eval
    mode; returns (model, checkpoint, path)."""
    path = select_checkpoint(RunPaths(run).fold(k), float(run_cfg.get("ema_decay", 0.0)) > 0)
    ckpt = read_checkpoint(path, trust=trust)
    model = build_model(model_config(ckpt, run_cfg))
    try:
        model.load_state_dict(ckpt.model_state_dict)
    except RuntimeError as e:
        raise BratsError(f"{path}: weights do not fit the configured model ({str(e).splitlines()[0]})") from e
    return model.eval().float(), ckpt, path


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
        f"fold {k}: {'EMA' if is_ema else 'regular'} best checkpoint {path} "
        f"(epoch {epoch}, stored val AUC {stored:.4f})"
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
        k, str(path), is_ema, epoch, stored, chosen["auc"], scored, fold.test, y, p_hgg, check.row()
    )


def precision_name(precision: str | None) -> str:
    """accelerate's mixed-precision value as read in a report: "no" is fp32."""
    return "fp32" if precision == "no" else str(precision or "unknown")


def rescore_precision(trained: str | None, device: torch.device) -> str:
    """The forward precision of a re-score: the one training validated in when this device can
    run it (mixed precision on a GPU), else fp32 ("no")."""
    return trained if device.type == "cuda" and trained in AUTOCAST else "no"


@dataclass(frozen=True)
class Verification:
    """A re-scored checkpoint against what it stored: its val AUC and, patient by patient, the
    stored p(HGG) (checkpoints record both; older ones the AUC only)."""

    stored_auc: float
    rescored_auc: float
    trained: str  # precision of the stored figures ("no" = fp32; "unknown" in older files)
    rescored: str
    max_abs_dp: float | None  # over the patients compared; None when none is stored
    worst: str  # the patient with the largest |dp|
    compared: int

    @property
    def tolerance(self) -> float:
        """Same precision: the same computation up to kernel choice. fp32 against a mixed
        precision: bf16 keeps 8 bits of mantissa, so probabilities move by up to a few 0.01."""
        return DP_TOLERANCE if self.trained in (self.rescored, "unknown") else DP_TOLERANCE_CROSS

    @property
    def ok(self) -> bool:
        auc_ok = abs(self.rescored_auc - self.stored_auc) <= AUC_TOLERANCE  # False for NaN
        return auc_ok and (self.max_abs_dp is None or self.max_abs_dp <= self.tolerance)

    @property
    def text(self) -> str:
        diff = abs(self.rescored_auc - self.stored_auc)
        verb = "matches" if diff <= AUC_TOLERANCE else "differs from"
        text = (
            f"re-scored val AUC {self.rescored_auc:.6f} {verb} the stored {self.stored_auc:.6f} "
            f"(|diff| {diff:.2e})"
        )
        if self.max_abs_dp is not None:
            text += (
                f"; per patient max |dp| {self.max_abs_dp:.2e} over {self.compared} ({self.worst}), "
                f"tolerance {self.tolerance:g}"
            )
        if self.trained != self.rescored and self.trained != "unknown":
            text += (
                f"; validated in {precision_name(self.trained)} during training, re-scored in "
                f"{precision_name(self.rescored)}"
            )
            if self.rescored == "no":
                text += " on the CPU (re-score on a GPU to compare like with like)"
        return text

    def row(self) -> dict:
        return {
            "validated_in": self.trained,
            "rescored_in": self.rescored,
            "max_abs_dp": self.max_abs_dp,
            "patients_compared": self.compared,
        }


def verify(
    ckpt: Checkpoint, rescored_p: dict[str, float], rescored_auc: float, precision: str
) -> Verification:
    """Compare a re-score with what `ckpt` stored (see `Verification`)."""
    common = [p for p in rescored_p if p in ckpt.val_probabilities]
    dps = {p: abs(float(rescored_p[p]) - float(ckpt.val_probabilities[p])) for p in common}
    worst = max(dps, key=dps.__getitem__) if dps else ""
    return Verification(
        ckpt.val_auc,
        rescored_auc,
        ckpt.mixed_precision or "unknown",
        precision,
        dps[worst] if dps else None,
        worst,
        len(dps),
    )


def roc_all_folds(results: list[FoldResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for r in results:
        if len(np.unique(r.labels)) == 2:
            RocCurveDisplay.from_predictions(r.labels, r.p_hgg, pos_label=1, name=f"fold {r.fold}", ax=ax)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_title("ROC, every fold (HGG positive)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_arrays(results: list[FoldResult]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and p(HGG) of every scored patient, pooled over the folds in fold order."""
    return np.concatenate([r.labels for r in results]), np.concatenate([r.p_hgg for r in results])


def summarize_folds(results: list[FoldResult], inner_val: float, seed: int = 0, select: str = "best") -> dict:
    """Table 1 (per fold), mean +- sample std, pooled out-of-fold AUC with a bootstrap CI."""
    table = [
        {
            "fold": r.fold,
            "best_epoch": r.epoch,
            "checkpoint": Path(r.checkpoint).name,
            "is_ema": r.is_ema,
            "stored_val_auc": r.stored_auc,
            "rescored_val_auc": r.rescored_auc,
            **r.verification,
            **{m: r.metrics[m] for m in METRICS},
            "n": len(r.labels),
        }
        for r in results
    ]
    summary = {m: dict(zip(("mean", "std"), mean_std([row[m] for row in table]))) for m in METRICS}
    labels, p = summary_arrays(results)
    pooled = {"n": int(len(labels)), "hgg": int(labels.sum()), "lgg": int(len(labels) - labels.sum())}
    pooled["majority_class_accuracy"] = max(pooled["hgg"], pooled["lgg"]) / max(pooled["n"], 1)
    if len(np.unique(labels)) == 2:
        pooled["auc"] = float(roc_auc_score(labels, p))
        lo, hi = bootstrap_auc_ci(labels, p, seed=seed)
        pooled["auc_ci95"] = [lo, hi]
    return {
        "protocol": protocol(inner_val, select),
        "optimistic": optimistic(inner_val, select),
        "folds": table,
        "mean_std": summary,
        "pooled": pooled,
    }


TABLE_1 = (  # (summary key, column name): the seed's Table 1 columns first; its F1 is macro-F1
    ("auc", "AUC"),
    ("macro_f1", "F1 (macro)"),
    ("f1", "F1 (HGG)"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced acc."),
)


def report_markdown(summary: dict, run: Path) -> str:
    """RUN/evaluation/report.md: what deserves trust first (the pooled out-of-fold AUC and the
    protocol that produced it), then Table 1 and its mean +- std, then the decision figures."""
    pooled = summary["pooled"]
    lines = [f"# Cross-validation report: {run}", ""]
    if "auc" in pooled:
        lo, hi = pooled["auc_ci95"]
        lines.append(
            f"**Pooled out-of-fold AUC: {pooled['auc']:.4f}** (bootstrap 95% CI {lo:.4f}-{hi:.4f}, "
            f"{pooled['n']} patients: {pooled['hgg']} HGG, {pooled['lgg']} LGG)."
        )
    lines += ["", f"Protocol: {summary['protocol']}."]
    if summary["optimistic"]:
        lines += [
            "",
            "Note: each fold's epoch was chosen on the same validation fold that is scored here, so these "
            "numbers are optimistic. Train with `--inner-val 0.15` for an unbiased estimate.",
        ]
    cols = [name for _, name in TABLE_1]
    lines += [
        "",
        "| Fold | Best Epoch | Checkpoint | " + " | ".join(cols) + " | Stored val AUC |",
        "|" + "|".join("---" for _ in range(len(cols) + 4)) + "|",
    ]
    for r in summary["folds"]:
        cells = " | ".join(f"{r[key]:.4f}" for key, _ in TABLE_1)
        lines.append(
            f"| {r['fold']} | {r['best_epoch']} | {r['checkpoint']} | {cells} | {r['stored_val_auc']:.4f} |"
        )
    lines += ["", "Verification (each checkpoint re-scored against what it stored):", ""]
    for r in summary["folds"]:
        dp = r.get("max_abs_dp")
        per_patient = f", per-patient max |dp| {dp:.1e}" if dp is not None else ""
        precisions = (
            f" ({precision_name(r.get('validated_in'))} in training, "
            f"{precision_name(r.get('rescored_in', 'no'))} here)"
        )
        lines.append(
            f"- fold {r['fold']}: val AUC stored {r['stored_val_auc']:.4f}, re-scored "
            f"{r['rescored_val_auc']:.4f}{per_patient}{precisions}"
        )
    ms = summary["mean_std"]
    lines += ["", "Mean +- sample std (ddof=1) across folds:", ""]
    for key, name in TABLE_1:
        lines.append(f"- **{name}**: {ms[key]['mean']:.4f} +- {ms[key]['std']:.4f}")
    lines += [
        "",
        "F1 (macro) is the mean of the HGG and LGG F1 scores (the seed's Table 1 F1); F1 (HGG) is the "
        "F1 of the HGG class alone, which the HGG majority keeps high.",
        "",
        f"Majority-class accuracy (always {'HGG' if pooled['hgg'] >= pooled['lgg'] else 'LGG'}): "
        f"{pooled['majority_class_accuracy']:.4f}.",
    ]
    if "calibration" in summary:
        lines += ["", *calibration_markdown(summary["calibration"], summary["decision"])]
    return "\n".join(lines) + "\n"


def calibration_markdown(figures: dict, decision: dict) -> list[str]:
    """The report's section on probabilities and the threshold (figures of summarize_calibration)."""
    raw = figures["raw"]
    lines = [
        "## Probabilities and the decision threshold",
        "",
        f"Raw p(HGG), pooled out-of-fold: Brier {raw['brier']:.4f}, ECE {raw['ece']:.4f} "
        f"({figures['bins']} bins; {RELIABILITY}).",
    ]
    if figures.get("balanced_sampler"):
        lines.append(
            "Training drew HGG and LGG patients equally often (the balanced sampler), so raw "
            "probabilities reflect a 50/50 prior rather than the cohort's share of HGG: "
            "`--calibrate platt` refits that prior (its intercept) and the confidence (its slope); "
            "`--calibrate temperature` refits the confidence only."
        )
    if "calibrated" in figures:
        cal = figures["calibrated"]
        params = (
            f"T = {1 / decision['slope']:.4f}"
            if decision["calibration"] == "temperature"
            else f"a = {decision['slope']:.4f}, b = {decision['intercept']:.4f}"
        )
        lines.append(
            f"Calibrated ({decision['calibration']}, {params}): Brier {cal['brier']:.4f}, "
            f"ECE {cal['ece']:.4f}."
        )
    op = figures["operating_point"]
    lines += [
        "",
        f"Decision threshold {decision['threshold']:.4f} (rule: {decision['rule']}) on the "
        f"{'calibrated' if 'calibrated' in figures else 'raw'} p(HGG): accuracy {op['accuracy']:.4f}, "
        f"sensitivity {op['sensitivity']:.4f}, specificity {op['specificity']:.4f}, "
        f"balanced accuracy {op['balanced_accuracy']:.4f} ({figures['how']}).",
        "The exported model carries this calibration and threshold; predict.py applies them.",
    ]
    return lines


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
) -> dict:
    """Evaluate `folds` (default: all K) of a run; writes RUN/evaluation/; returns the summary.
    `calibrate` and `threshold` choose the decision fitted on the pooled out-of-fold predictions
    (brats/calibration.py)."""
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
        raise BratsError(f"--folds {bad}: this run has folds 0..{cfg.folds - 1}")
    missing = [k for k in wanted if not paths.fold(k).is_dir()]
    if missing:
        raise BratsError(
            f"{run}: fold(s) {', '.join(map(str, missing))} not trained; "
            "train them or leave them out with --folds"
        )
    dev = resolve_device(device)
    out = check_outputs(paths, wanted)
    cached = open_data(data or cfg.data, cfg.size)
    splits = load_or_make_splits(
        paths.splits, cached.patient_ids, cached.labels.tolist(), cfg.folds, cfg.split_seed, cfg.inner_val
    )
    results = [evaluate_fold(run, k, run_cfg, cached, splits, trust, strict, dev, batch) for k in wanted]

    summary = summarize_folds(results, cfg.inner_val, select=cfg.select)
    summary["run"] = str(run)
    labels, p_oof = summary_arrays(results)
    folds_of = np.concatenate([np.full(len(r.labels), r.fold) for r in results])
    decision, summary["calibration"] = summarize_calibration(labels, p_oof, folds_of, calibrate, threshold)
    summary["calibration"]["balanced_sampler"] = cfg.sampler == "inverse_freq"
    summary["decision"] = decision.to_dict()
    rows = [
        {"patient_id": p, "fold": r.fold, "label": int(y), "p_hgg": float(prob)}
        for r in results
        for p, y, prob in zip(r.patient_ids, r.labels, r.p_hgg)
    ]
    for row, p_cal in zip(rows, decision.calibrate(p_oof)):
        row["p_hgg_calibrated"] = float(p_cal)
    with staged(out) as stage:
        for r in results:
            title = f"fold {r.fold} epoch {r.epoch}"
            save_plots(stage / RunPaths.fold_name(r.fold), r.labels, r.p_hgg, title=title)
        roc_all_folds(results, stage / "roc_all_folds.png")
        curves = {"raw": summary["calibration"]["raw"]["reliability"]}
        if "calibrated" in summary["calibration"]:
            curves[f"{calibrate} (cross-fitted)"] = summary["calibration"]["calibrated"]["reliability"]
        reliability_diagram(stage / RELIABILITY, curves)
        with open(stage / paths.predictions.name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (stage / paths.summary.name).write_text(json.dumps(summary, indent=2) + "\n")
        (stage / paths.report.name).write_text(report_markdown(summary, run))
    return summary


def check_outputs(paths: RunPaths, folds: list[int]) -> Path:
    """RUN/evaluation can be written, before any scoring: a folder (created if missing) whose
    files and plot folders are not in the way; temp files of a killed evaluation are removed."""
    out = paths.evaluation
    if out.exists() and not out.is_dir():
        raise BratsError(f"{out} is a file, where the evaluation writes its results: move it away")
    check_output_dir(out, "evaluation results")
    remove_stale_temps(out)
    for f in (paths.summary, paths.report, paths.predictions, out / "roc_all_folds.png", out / RELIABILITY):
        if f.is_dir():
            raise BratsError(f"{f} is a folder, where the evaluation writes a file: move it away")
    for k in folds:
        if (out / RunPaths.fold_name(k)).exists() and not (out / RunPaths.fold_name(k)).is_dir():
            raise BratsError(
                f"{out / f'fold_{k}'} is a file, where the evaluation writes plots: move it away"
            )
    return out


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temp folder inside `out` to write every result into; on success each file is fsynced and
    renamed to its place in `out`, so a full disk or an error leaves the previous results whole."""
    stage = temp_path(out / "evaluation")
    try:
        stage.mkdir()
        yield stage
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        for f in files:
            target = out / f.relative_to(stage)
            target.parent.mkdir(exist_ok=True)
            os.replace(f, target)
        fsync_dir(out)
    except OSError as e:
        raise write_error(out, e) from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)
