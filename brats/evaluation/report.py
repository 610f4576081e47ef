"""The cross-validation report (RUN/evaluation/report.md) from the evaluation summary."""

from __future__ import annotations

from pathlib import Path

from brats.evaluation.calibration import SLOPE_CAP
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
    lines += [line for w in summary.warnings for line in ("", f"**Warning**: {w}.")]
    lines += pooled_versus_mean(summary)
    if summary.optimistic:
        lines += [
            "",
            "Note: each fold's epoch was chosen on the same validation fold that is scored here, so these "
            "numbers are optimistic. Train with `--inner-val 0.15` for an unbiased estimate.",
        ]
    cols = [name for _, name in TABLE_1]
    lines += [
        "",
        "| Fold | Epoch kept | Checkpoint | " + " | ".join(cols) + " | Stored val AUC |",
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
        "RECIPE.md 4); F1 (HGG) is the F1 of the HGG class alone"
        + (", which the HGG majority keeps high." if pooled["hgg"] > pooled["lgg"] else "."),
        "",
        f"Majority-class accuracy (always {'HGG' if pooled['hgg'] >= pooled['lgg'] else 'LGG'}): "
        f"{pooled['majority_class_accuracy']:.4f}.",
    ]
    if summary.calibration:
        lines += ["", *calibration_markdown(summary.calibration, summary.decision)]
    if summary.test_set:
        lines += ["", *test_set_markdown(summary.test_set)]
    if summary.confound:
        lines += ["", *confound_markdown(summary.confound)]
    return "\n".join(lines) + "\n"


AUC_GAP = 0.05  # pooled and mean per-fold AUC further apart than this: the report says why


def pooled_versus_mean(summary: Summary) -> list[str]:
    """Why the report leads with the pooled AUC, when it and the mean of the folds' AUCs differ."""
    pooled, mean = summary.pooled.get("auc"), summary.mean_std["auc"]["mean"]
    if pooled is None or not abs(pooled - mean) > AUC_GAP:
        return []
    return [
        "",
        f"The pooled AUC ({pooled:.4f}) and the mean of the folds' AUCs ({mean:.4f} +- "
        f"{summary.mean_std['auc']['std']:.4f}) differ by more than {AUC_GAP}. A fold's AUC only ranks "
        "that fold's patients against each other; the pooled AUC ranks every patient against every "
        "other, so it also pays when the folds' models put their scores on different scales (one fold's "
        "LGG scored above another fold's HGG). A deployed model, and any single threshold, meets "
        "patients on one scale: the pooled figure is the one that describes it, and the gap measures "
        "how much the fold models disagree.",
    ]


def _number(v: float) -> str:
    return f"{'>=' if v >= SLOPE_CAP else '<=' if v <= -SLOPE_CAP else ''}{v:.2f}"


def slope_text(figures: dict) -> str:
    """The calibration slope and its CI ("-" where not defined)."""
    if "slope" not in figures:
        return "-"
    lo, hi = figures["slope_ci95"]
    return f"{_number(figures['slope'])} ({_number(lo)} to {_number(hi)})"


def line_of(figures: dict) -> str:
    """The calibration slope and intercept with their CIs (brats.evaluation.calibration)."""
    if "slope" not in figures:
        return ""
    i = figures["intercept_ci95"]
    return (
        f"calibration slope {slope_text(figures)}, intercept {figures['intercept']:.2f} "
        f"({i[0]:.2f} to {i[1]:.2f})"
    )


def test_set_markdown(test: dict) -> list[str]:
    """The held-out test set: each fold model and the ensemble (brats.evaluation.test_set)."""
    ens = test["ensemble"]
    single, own = ens["single_fold_decision"], ens["own_decision"]
    lo, hi = single["auc_ci95"]
    lines = [
        "## The held-out test set",
        "",
        f"{test['n']} patients ({test['hgg']} HGG, {test['lgg']} LGG) held out of every fold: no fold model "
        "trained on them or chose its epoch on them.",
        "",
        f"**Ensemble of folds {', '.join(map(str, ens['folds']))}: AUC {single['auc']:.4f}** "
        f"(bootstrap 95% CI {lo:.4f}-{hi:.4f}).",
        "",
        "| Model | AUC (95% CI) | Accuracy | Sensitivity | Specificity | Brier | Calibration slope |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(f"fold {k}", f) for k, f in test["folds"].items()]
    rows.append(("ensemble, single-fold decision", single))
    for name, f in rows:
        op, (a, b) = f["operating_point"], f["auc_ci95"]
        lines.append(
            f"| {name} | {f['auc']:.3f} ({a:.3f}-{b:.3f}) | {op['accuracy']:.3f} | {op['sensitivity']:.3f} | "
            f"{op['specificity']:.3f} | {f['brier']:.3f} | {slope_text(f)} |"
        )
    op = own["operating_point"]
    brier = own["calibrated" if "calibrated" in own else "raw"]["brier"]
    lines += [
        "",
        "Rows at the single-fold decision use the calibration and threshold fitted on the pooled "
        "out-of-fold predictions (what a single-fold export ships). The ensemble averages the folds' "
        "probabilities, which makes it another model: that decision need not transfer to it.",
        "",
        f"The ensemble's own decision ({ens['decision']['calibration']}, threshold "
        f"{ens['decision']['threshold']:.4f}, rule {ens['decision']['rule']}), which an ensemble export "
        f"ships: accuracy {op['accuracy']:.3f}, sensitivity {op['sensitivity']:.3f}, specificity "
        f"{op['specificity']:.3f}, Brier {brier:.3f} ({own['how']}).",
        f"Protocol: {test['protocol']}.",
    ]
    if test["n"] < 40:
        lines.append(
            f"With {test['n']} test patients every figure here is uncertain (see the CIs); the decision "
            "fitted on them is too."
        )
    return lines


def confound_markdown(c: dict) -> list[str]:
    """The site confound section (brats.evaluation.confound)."""
    table = c["collections"]
    lines = ["## Site confound", ""]
    if len(table) < 2:
        name = next(iter(table), "unknown")
        return [*lines, f"One data collection ({name}): no site can stand in for the grade here."]
    if c.get("flagged"):
        lines += [
            f"**Flagged: the collection alone grades these patients with AUC {c['site_only_auc']:.3f}** "
            f"({c['one_grade_share']:.0%} of them come from collections holding one grade only). A model can "
            "separate the grades by site (scanner, protocol) without looking at the tumour, and the AUCs "
            "above cannot tell. Trust the AUC within the collections that hold both grades, and train with "
            "`--group-by collection` (each collection in one validation fold) to see what survives a site "
            "the model has not trained on.",
            "",
        ]
    else:
        lines += [
            f"The collection alone grades these patients with AUC {c.get('site_only_auc', 0.5):.3f}: "
            "not flagged.",
            "",
        ]
    lines += ["| Collection | HGG | LGG | AUC within |", "|---|---|---|---|"]
    for name, t in table.items():
        within = c["within"].get(name)
        auc = f"{within['auc']:.3f}" if within else "-"
        lines.append(f"| {name} | {t['hgg']} | {t['lgg']} | {auc} |")
    return lines


def calibration_markdown(figures: dict, decision: dict) -> list[str]:
    """The report's section on probabilities and the threshold (figures of summarize_calibration)."""
    raw, nan = figures["raw"], float("nan")
    slope = line_of(raw)
    lines = [
        "## Probabilities and the decision threshold",
        "",
        f"Raw p(HGG), pooled out-of-fold: Brier {raw['brier']:.4f}, log loss {raw.get('log_loss', nan):.4f}, "
        f"ECE {raw['ece']:.4f} ({figures['bins']} bins; {RELIABILITY}){'; ' + slope if slope else ''}.",
        "ECE alone cannot tell a calibrated model from an uncalibrated one on a few hundred patients "
        "(a perfectly calibrated model scores about 0.05 at n = 285); the slope (1 = as confident as it "
        "should be, above 1 underconfident, below 1 overconfident) and the intercept (0 = the mean "
        "p(HGG) matches the share of HGG) come with their CIs.",
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
            f"Calibrated ({decision['calibration']}, {params}), cross-fitted: Brier {cal['brier']:.4f}, "
            f"log loss {cal['log_loss']:.4f}, ECE {cal['ece']:.4f}; {line_of(cal)}."
        )
        if figures.get("forced"):
            lines.append(
                "**This calibration makes the cross-fitted Brier score or log loss worse than the raw "
                "probabilities'**; it is kept because `--force-calibration` asked for it."
            )
        else:
            lines.append("It improves the cross-fitted Brier score and log loss: it is kept.")
    if "not_shipped" in figures:
        tried = figures["not_shipped"]
        cross = tried["cross_fitted"]
        why = (
            f"{tried['reason']}. The decision uses the raw probabilities."
            if "reason" in tried
            else f"cross-fitted, it made the probabilities worse (Brier {cross['brier']:.4f}, log loss "
            f"{cross['log_loss']:.4f} against the raw {raw['brier']:.4f} and {raw['log_loss']:.4f}). The "
            "decision uses the raw probabilities; `--force-calibration` keeps it anyway."
        )
        lines.append(f"`--calibrate {tried['method']}` was fitted but **not kept**: {why}")
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
