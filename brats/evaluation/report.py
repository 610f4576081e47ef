"""The cross-validation report (RUN/evaluation/report.md) from the evaluation summary."""

from __future__ import annotations

from pathlib import Path

from brats.evaluation.verification import precision_name
from brats.runs.summary import Summary

RELIABILITY = "reliability.png"  # in RUN/evaluation/


# (summary key, column name): the training report's Table 1 columns first; its F1 is macro-F1 (RECIPE.md 4)
TABLE_1 = (
    ("auc", "AUC"),
    ("macro_f1", "F1 (macro)"),
    ("f1", "F1 (HGG)"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced acc."),
)


def report_markdown(summary: Summary, run: Path) -> str:
    """RUN/evaluation/report.md: what deserves trust first (the pooled out-of-fold AUC and the
    protocol that produced it), then Table 1 and its mean +- std, then the decision figures."""
    pooled = summary.pooled
    lines = [f"# Cross-validation report: {run}", ""]
    if "auc" in pooled:
        lo, hi = pooled["auc_ci95"]
        lines.append(
            f"**Pooled out-of-fold AUC: {pooled['auc']:.4f}** (bootstrap 95% CI {lo:.4f}-{hi:.4f}, "
            f"{pooled['n']} patients: {pooled['hgg']} HGG, {pooled['lgg']} LGG)."
        )
    lines += ["", f"Protocol: {summary.protocol}."]
    if summary.optimistic:
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
    for r in summary.folds:
        cells = " | ".join(f"{r.metrics[key]:.4f}" for key, _ in TABLE_1)
        lines.append(f"| {r.fold} | {r.best_epoch} | {r.checkpoint} | {cells} | {r.stored_val_auc:.4f} |")
    unfinished = [r for r in summary.folds if r.finished is False]
    if unfinished:
        said = ", ".join(f"fold {r.fold} (stopped after epoch {r.epochs_trained})" for r in unfinished)
        lines += [
            "",
            f"**Unfinished folds**: {said}: their training was killed or is still running, and their "
            "checkpoints are scored as they are. Resume them (`--resume`) before trusting these numbers; "
            "export.py refuses them unless `--allow-unfinished`.",
        ]
    lines += ["", "Verification (each checkpoint re-scored against what it stored):", ""]
    for r in summary.folds:
        per_patient = f", per-patient max |dp| {r.max_abs_dp:.1e}" if r.max_abs_dp is not None else ""
        precisions = (
            f" ({precision_name(r.validated_in)} in training, {precision_name(r.rescored_in or 'no')} here)"
        )
        lines.append(
            f"- fold {r.fold}: val AUC stored {r.stored_val_auc:.4f}, re-scored "
            f"{r.rescored_val_auc:.4f}{per_patient}{precisions}"
        )
    ms = summary.mean_std
    lines += ["", "Mean +- sample std (ddof=1) across folds:", ""]
    for key, name in TABLE_1:
        lines.append(f"- **{name}**: {ms[key]['mean']:.4f} +- {ms[key]['std']:.4f}")
    lines += [
        "",
        "F1 (macro) is the mean of the HGG and LGG F1 scores (the F1 of the training report's Table 1, "
        "RECIPE.md 4); F1 (HGG) is the "
        "F1 of the HGG class alone, which the HGG majority keeps high.",
        "",
        f"Majority-class accuracy (always {'HGG' if pooled['hgg'] >= pooled['lgg'] else 'LGG'}): "
        f"{pooled['majority_class_accuracy']:.4f}.",
    ]
    if summary.calibration:
        lines += ["", *calibration_markdown(summary.calibration, summary.decision)]
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
