"""Re-score every fold's checkpoint by the explicit policy, verify it, write the CV report.

Each number in the report is traceable to one named checkpoint (seed 2.5 / 3.5 / 6.6): the file is
chosen by the policy (best_ema.pt when the run used EMA, else best.pt, never the resume state),
loaded weights-only, re-scored in fp32 on the fold's patients from splits.json, and its
re-computed val AUC is checked against the AUC stored when it was saved.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from brats.atomic import write_csv_atomic, write_json_atomic, write_text_atomic
from brats.cache import open_data
from brats.checkpoint import Checkpoint, read_checkpoint, select_checkpoint
from brats.config import TrainConfig
from brats.data import CachedVolumes
from brats.errors import BratsError
from brats.folds import load_or_make_splits, protocol
from brats.metrics import METRICS, bootstrap_auc_ci, mean_std, save_plots
from brats.model import build_model
from brats.runs import RunPaths
from brats.scoring import predict, score

log = logging.getLogger(__name__)

AUC_TOLERANCE = 0.01  # seed 3.5: warn when re-scored and stored AUC differ by more


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


def run_config(run: Path) -> dict:
    path = RunPaths(run).config
    if not path.is_file():
        raise BratsError(f"{run}: no {path.name}: is this a run folder made by train.py?")
    return json.loads(path.read_text())


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

    def rescore(patients: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
        ds = CachedVolumes(cached, cached.indices(patients), modalities)
        logits, y = predict(model, DataLoader(ds, batch_size=batch, shuffle=False))
        metrics, p_hgg = score(logits, y)
        return metrics, y, p_hgg

    scored, y, p_hgg = rescore(fold.test)
    chosen = scored if fold.val == fold.test else rescore(fold.val)[0]
    diff = abs(chosen["auc"] - stored)
    if not diff <= AUC_TOLERANCE:  # also when either is NaN
        msg = (
            f"fold {k}: re-scored val AUC {chosen['auc']:.4f} differs from the stored {stored:.4f} of {path}"
        )
        if strict:
            raise BratsError(msg + " (--strict)")
        log.warning(msg)
    else:
        log.info(
            f"fold {k}: re-scored val AUC {chosen['auc']:.6f} matches stored {stored:.6f} (|diff| {diff:.2e})"
        )
    return FoldResult(k, str(path), is_ema, epoch, stored, chosen["auc"], scored, fold.test, y, p_hgg)


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


def summarize_folds(results: list[FoldResult], inner_val: float, seed: int = 0) -> dict:
    """Table 1 (per fold), mean +- sample std, pooled out-of-fold AUC with a bootstrap CI."""
    table = [
        {
            "fold": r.fold,
            "best_epoch": r.epoch,
            "checkpoint": Path(r.checkpoint).name,
            "is_ema": r.is_ema,
            "stored_val_auc": r.stored_auc,
            "rescored_val_auc": r.rescored_auc,
            **{m: r.metrics[m] for m in METRICS},
            "n": len(r.labels),
        }
        for r in results
    ]
    summary = {m: dict(zip(("mean", "std"), mean_std([row[m] for row in table]))) for m in METRICS}
    labels = np.concatenate([r.labels for r in results])
    p = np.concatenate([r.p_hgg for r in results])
    pooled = {"n": int(len(labels)), "hgg": int(labels.sum()), "lgg": int(len(labels) - labels.sum())}
    pooled["majority_class_accuracy"] = max(pooled["hgg"], pooled["lgg"]) / max(pooled["n"], 1)
    if len(np.unique(labels)) == 2:
        pooled["auc"] = float(roc_auc_score(labels, p))
        lo, hi = bootstrap_auc_ci(labels, p, seed=seed)
        pooled["auc_ci95"] = [lo, hi]
    return {
        "protocol": protocol(inner_val),
        "optimistic": inner_val <= 0,
        "folds": table,
        "mean_std": summary,
        "pooled": pooled,
    }


def report_markdown(summary: dict, run: Path) -> str:
    lines = [f"# Cross-validation report: {run}", "", f"Protocol: {summary['protocol']}.", ""]
    lines += [
        "| Fold | Best Epoch | Checkpoint | AUC | F1-score | Accuracy | Balanced acc. | Stored val AUC |",
        "|------|-----------|------------|-----|----------|----------|---------------|----------------|",
    ]
    for r in summary["folds"]:
        lines.append(
            f"| {r['fold']} | {r['best_epoch']} | {r['checkpoint']} | {r['auc']:.4f} | {r['f1']:.4f} | "
            f"{r['accuracy']:.4f} | {r['balanced_accuracy']:.4f} | {r['stored_val_auc']:.4f} |"
        )
    ms = summary["mean_std"]
    lines += ["", "Mean +- sample std (ddof=1) across folds:", ""]
    for m, name in (
        ("auc", "AUC"),
        ("f1", "F1-score"),
        ("accuracy", "Accuracy"),
        ("balanced_accuracy", "Balanced accuracy"),
    ):
        lines.append(f"- **{name}**: {ms[m]['mean']:.4f} +- {ms[m]['std']:.4f}")
    pooled = summary["pooled"]
    lines.append("")
    if "auc" in pooled:
        lo, hi = pooled["auc_ci95"]
        lines.append(
            f"Pooled out-of-fold AUC over {pooled['n']} patients: {pooled['auc']:.4f} "
            f"(bootstrap 95% CI {lo:.4f}-{hi:.4f})."
        )
    lines.append(
        f"Majority-class accuracy (always {'HGG' if pooled['hgg'] >= pooled['lgg'] else 'LGG'}): "
        f"{pooled['majority_class_accuracy']:.4f} "
        f"({pooled['hgg']} HGG, {pooled['lgg']} LGG)."
    )
    if summary["optimistic"]:
        lines += [
            "",
            "Note: each fold's epoch was chosen on the same validation fold that is scored here, so these "
            "numbers are optimistic. Train with `--inner-val 0.15` for an unbiased estimate.",
        ]
    return "\n".join(lines) + "\n"


def evaluate_run(
    run: str | Path,
    folds: list[int] | None = None,
    strict: bool = False,
    trust: bool = False,
    data: str | None = None,
    device: str | None = None,
    batch: int = 4,
) -> dict:
    """Evaluate `folds` (default: all K) of a run; writes RUN/evaluation/; returns the summary."""
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
    cached = open_data(data or cfg.data, cfg.size)
    splits = load_or_make_splits(
        paths.splits, cached.patient_ids, cached.labels.tolist(), cfg.folds, cfg.split_seed, cfg.inner_val
    )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = [evaluate_fold(run, k, run_cfg, cached, splits, trust, strict, dev, batch) for k in wanted]

    out = paths.evaluation
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        save_plots(out / f"fold_{r.fold}", r.labels, r.p_hgg, title=f"fold {r.fold} epoch {r.epoch}")
    roc_all_folds(results, out / "roc_all_folds.png")
    rows = [
        {"patient_id": p, "fold": r.fold, "label": int(y), "p_hgg": float(prob)}
        for r in results
        for p, y, prob in zip(r.patient_ids, r.labels, r.p_hgg)
    ]
    write_csv_atomic(paths.predictions, rows, ["patient_id", "fold", "label", "p_hgg"])
    summary = summarize_folds(results, cfg.inner_val)
    summary["run"] = str(run)
    write_json_atomic(paths.summary, summary)
    write_text_atomic(paths.report, report_markdown(summary, run))
    return summary
