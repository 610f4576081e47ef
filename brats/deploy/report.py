"""What predict.py says: the patients it was given (each once), the CSV rows, the table, and the
new patients' accuracy beside the model's out-of-fold figures.

No torch here: predict.py runs without it.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from dataclasses import replace
from pathlib import Path

from brats.data.cohort import MODALITIES, Case, find_cases
from brats.deploy.contract import card_path, parse_rule
from brats.deploy.inference import Grader, Prediction
from brats.errors import BratsError, CaseError
from brats.io.names import id_hash

CSV_FIELDS = [
    "patient_id",
    "p_hgg",
    "p_lgg",
    "prediction",
    "threshold",
    "error",
    "qc",  # pass | warn | fail (refused unless --qc warn) | off
    "qc_reasons",
    "ood",  # yes | no | empty: the model carries no reference
    "ood_distance",
    "ood_percentile",  # of the distance among the out-of-fold patients'
    "fold_spread",  # max - min of the fold models' p(HGG) (ensembles)
    "flagged",  # graded, with a reason to distrust the grade
    "trained_on",  # yes: the model trained on this patient (by id): no new patient's grade
]
CSV_PREFIX = "patient_id,p_hgg,p_lgg,prediction"  # what every predictions CSV of this tool starts with


def gather_cases(
    inputs: list[Path], explicit: dict[str, Path | None], patient_id: str
) -> tuple[list[Case], list[CaseError], dict[str, int]]:
    """Every patient given, once: the same files reached twice (a folder given twice, a patient
    folder and its cohort root) are one patient. Returns (cases, problems, {patient: times given})
    for the patients given more than once."""
    cases, problems = [], []
    given = {m: p for m, p in explicit.items() if p is not None}
    if given:
        missing = [m for m in MODALITIES if m not in given]
        if missing:
            raise BratsError(f"--{' --'.join(missing)} missing: give all four of --t1 --t1ce --t2 --flair")
        cases.append(Case(patient_id, None, tuple(Path(given[m]) for m in MODALITIES)))
    for root in inputs:
        cohort = find_cases(root, labelled=False)
        cases += cohort.cases
        problems += cohort.problems
    if not cases and not problems:
        raise BratsError(
            "no patients given: pass patient folders, a cohort root, or --t1/--t1ce/--t2/--flair"
        )
    unique: dict[tuple, Case] = {}
    times: Counter[str] = Counter()
    for case in cases:
        key = tuple(p.resolve() for p in case.paths)
        first = unique.setdefault(key, case)
        times[first.patient_id] += 1
        if first.label is None and case.label is not None:  # the grade found in a labelled layout
            unique[key] = replace(first, label=case.label)
    kept, clashes = split_id_clashes(list(unique.values()))
    unique_problems = {(e.patient_id, e.reason): e for e in problems + clashes}
    times.update(e.patient_id for e in problems)
    repeated = {pid: n for pid, n in times.items() if n > 1 and pid not in {e.patient_id for e in clashes}}
    return kept, list(unique_problems.values()), repeated


def split_id_clashes(cases: list[Case]) -> tuple[list[Case], list[CaseError]]:
    """Two different patients (other files) under one id get one CSV row and one map file name
    between them: neither is graded, and the line names both folders."""
    by_id: dict[str, list[Case]] = {}
    for case in cases:
        by_id.setdefault(case.patient_id, []).append(case)
    kept, clashes = [], []
    for pid, group in by_id.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        folders = " and ".join(str(c.paths[0].parent) for c in group)
        clashes.append(
            CaseError(
                pid, f"two different patients carry this id ({folders}): rename one; neither was graded"
            )
        )
    return kept, clashes


def protected_paths(model: Path, inputs: list[Path], cases: list[Case]) -> dict[Path, str]:
    """What predict reads, which its outputs must never replace: the model, every input given,
    and each patient's scans and folder."""
    protected = {Path(model): "the model", **{Path(p): "an input of this command" for p in inputs}}
    for case in cases:
        for mod, path in zip(MODALITIES, case.paths):
            protected[path] = f"{case.patient_id}'s {mod} scan"
            protected.setdefault(path.parent, f"{case.patient_id}'s folder")
    return protected


def is_predictions_csv(head: bytes) -> bool:
    """The first bytes of a CSV predict writes (now or before QC columns existed): a manifest or an
    evaluation's predictions.csv also start with patient_id, and are not replaced."""
    return head.startswith(CSV_PREFIX.encode())


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound for the few patients of a check)."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = 1.96) -> tuple[float, float]:
    """95% CI of the difference k1/n1 - k2/n2 of two independent proportions (Newcombe's hybrid
    score interval, from each proportion's Wilson interval): sound for small n and for
    proportions near 0 or 1, where the simple Wald interval is not."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def reference_point(grader: Grader) -> tuple[dict | None, int, str]:
    """The accuracy the model's own evaluation measured at its decision, over how many
    patients, and where: the ensemble's own test-set figures when its decision was fitted there,
    else the single fold models' pooled out-of-fold figures."""
    perf = grader.provenance.get("performance") or {}
    if perf.get("decision_fitted_on") == "ensemble_test_set" and "test_set" in perf:
        test = perf["test_set"]
        return test["operating_point"], int(test["n"]), "the ensemble on its held-out test set (cross-fitted)"
    cv = grader.provenance.get("cv_summary") or {}
    point = (cv.get("calibration") or {}).get("operating_point")
    n = int((cv.get("pooled") or {}).get("n", 0))
    ensemble = bool(grader.provenance.get("ensemble"))
    who = "the fold models this ensemble averages" if ensemble else "the fold models"
    return point, n, f"out-of-fold ({who}, each on patients it never trained on)"


def compare_out_of_fold(grader: Grader, override: float | None, right: int, graded: int) -> str:
    """One line setting the new patients' accuracy beside the accuracy the model's evaluation
    measured at the same decision, with the 95% CI of their difference (both are estimates)."""
    point, n, where = reference_point(grader)
    if not point or not n:
        return "out-of-fold accuracy: not in this model's metadata (export it again to compare)"
    if override is not None and override != grader.decision.threshold:
        return (
            f"{where}: accuracy {point['accuracy']:.2f} over {n} patients was measured at threshold "
            f"{grader.decision.threshold:.4g}, not at --threshold {override:g}"
        )
    acc = point["accuracy"]
    lo, hi = newcombe_interval(right, graded, round(acc * n), n)
    cv = grader.provenance.get("cv_summary") or {}
    reasons = ["these patients differ from the patients the model was evaluated on"]
    if cv.get("optimistic") and where.startswith("out-of-fold"):
        reasons.append(
            "the out-of-fold figure is optimistic (each fold's epoch was chosen on the patients scored)"
        )
    if grader.provenance.get("ensemble") and where.startswith("out-of-fold"):
        reasons.append(
            "the decision was fitted on each fold model's probabilities, and the ensemble averages them"
        )
    verdict = (
        "the difference is within chance"
        if lo <= 0 <= hi
        else "more than chance separates the two (either " + ", or ".join(reasons) + ")"
    )
    return (
        f"{where} at the same decision: accuracy {acc:.2f} (sensitivity {point['sensitivity']:.2f}, "
        f"specificity {point['specificity']:.2f}) over {n} patients; new minus evaluated "
        f"{right / graded - acc:+.2f} (95% CI {lo:+.2f} to {hi:+.2f}, Newcombe): {verdict}"
    )


MODALITY_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def rule_in_words(rule: str) -> str:
    """How a decision rule chose its threshold, for a reader who has not seen the code."""
    if rule == "youden":
        return "the threshold at which sensitivity plus specificity is highest (Youden's J)"
    if rule.startswith("sensitivity:"):
        return f"the highest threshold reaching a sensitivity of {float(rule.split(':')[1]):.0%}"
    return "a fixed threshold"


def describe_model(grader: Grader, override: float | None) -> str:
    """One plain paragraph: what the model grades from what, what it was trained and measured on,
    and its decision rule in words. Details stay in the model card."""
    prov, d = grader.provenance, grader.decision
    cv, perf = prov.get("cv_summary") or {}, prov.get("performance") or {}
    pooled = cv.get("pooled") or {}
    mods = ", ".join(MODALITY_NAMES.get(m, m) for m in grader.cfg.modalities)
    text = [
        f"This model grades a glioma as HGG or LGG from {mods} scans in BraTS space (co-registered, "
        "1 mm, skull-stripped)."
    ]
    n = len(prov.get("sources") or []) or 1
    if pooled.get("n"):
        who = f"an ensemble of {n} fold models" if n > 1 else "one fold model"
        grades = f" ({pooled['hgg']} HGG, {pooled['lgg']} LGG)" if "hgg" in pooled and "lgg" in pooled else ""
        text.append(f"It is {who} of a cross-validation over {pooled['n']} patients{grades}.")
    if "auc" in pooled:
        lo, hi = pooled["auc_ci95"]
        caveat = " (optimistic: each fold chose its epoch on the patients it was scored on)"
        caveat = caveat if cv.get("optimistic") else ""
        text.append(f"Cross-validated AUC {pooled['auc']:.2f} (95% CI {lo:.2f}-{hi:.2f}){caveat}.")
    test = perf.get("test_set")
    if test and "auc" in test:
        lo, hi = test["auc_ci95"]
        held = f"On {test['n']} patients held out of all training"
        text.append(f"{held}: AUC {test['auc']:.2f} (95% CI {lo:.2f}-{hi:.2f}).")
    prob = "its probability of HGG"
    if d.calibration != "none":
        prob += f" (recalibrated, {d.calibration} scaling)"
    if override is not None:
        text.append(f"Here a patient is called HGG when {prob} is at least {override:g} (--threshold).")
    else:
        own = perf.get("decision_fitted_on") == "ensemble_test_set"
        where = "the held-out patients" if own else "the cross-validation"
        chosen = "" if parse_rule(d.rule)[0] == "fixed" else f", {rule_in_words(d.rule)} on {where}"
        text.append(f"It calls a patient HGG when {prob} is at least {d.threshold:.2f}{chosen}.")
    if perf.get("transfer"):
        sd = perf.get("fold_logit_sd")
        spread = f" (its fold models' logits differ by SD {sd['median']:.2f} per patient, median)"
        text.append(f"Note: {perf['transfer']}{spread if sd else ''}.")
    text.append(f"Details: {card_path(grader.path, '.md')}.")
    return textwrap.fill(" ".join(text), width=100, break_on_hyphens=False)


def seen_in_training(grader: Grader, results: list[Prediction]) -> set[str]:
    """The graded patients the model trained on, by id (its provenance's hashed ids)."""
    trained = set(grader.provenance.get("trained_on", []))
    return {r.patient_id for r in results if r.p_hgg is not None and id_hash(r.patient_id) in trained}


def csv_rows(results: list[Prediction], seen: set[str] = frozenset()) -> list[dict]:
    """One CSV row per patient (CSV_FIELDS), in the order graded."""

    def number(v: float | None, digits: int = 4) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    return [
        {
            "patient_id": r.patient_id,
            "p_hgg": number(r.p_hgg, 6),
            "p_lgg": number(r.p_lgg, 6),
            "prediction": r.prediction,
            "threshold": f"{r.threshold:.6g}",
            "error": r.error,
            "qc": r.qc.status,
            "qc_reasons": r.qc.text,
            "ood": {None: "", True: "yes", False: "no"}[r.doubt.ood],
            "ood_distance": number(r.doubt.distance),
            "ood_percentile": number(r.doubt.percentile, 1),
            "fold_spread": number(r.doubt.spread),
            "flagged": "yes" if r.flagged else "",
            "trained_on": "yes" if r.patient_id in seen else "",
        }
        for r in results
    ]


def table_lines(results: list[Prediction], truth: dict[str, str]) -> list[str]:
    """The printed table: patient, p_hgg, prediction, QC, out-of-distribution, and the grade on
    disk when any is known; then the reason for each flag."""
    width = max([len(r.patient_id) for r in results] + [10])
    head = f"{'patient':<{width}}  {'p_hgg':>8}  prediction  qc    ood" + ("  grade on disk" if truth else "")
    lines = [head]
    for r in results:
        p = "-" if r.p_hgg is None else f"{r.p_hgg:.4f}"
        grade = r.prediction or ("REFUSED" if r.qc.status == "fail" else "FAILED")
        ood = {None: "-", True: "yes", False: "no"}[r.doubt.ood]
        known = f"  {truth.get(r.patient_id, '')}" if truth else ""
        lines.append(f"{r.patient_id:<{width}}  {p:>8}  {grade:<10}  {r.qc.status:<4}  {ood:<3}{known}")
    for r in results:
        why = r.qc.reasons + r.doubt.reasons
        if why and not r.error:
            lines.append(f"  {r.patient_id}: " + "; ".join(why))
    return lines


def summary_line(results: list[Prediction]) -> str:
    """How many were graded (and of them flagged), refused by QC, and failed."""
    graded = [r for r in results if r.p_hgg is not None]
    refused = [r for r in results if r.p_hgg is None and r.qc.status == "fail" and not r.error]
    failed = [r for r in results if r.error]
    flagged = sum(r.flagged for r in graded)
    return (
        f"{len(graded)} graded, {len(failed)} failed; {len(refused)} refused by QC, {flagged} graded but "
        "flagged (QC warning, out of distribution or fold disagreement)"
    )


def accuracy_lines(
    grader: Grader, results: list[Prediction], truth: dict[str, str], override: float | None
) -> list[str]:
    """The graded patients whose grade is on disk: how many match, with a 95% CI, for all of them
    and for those not flagged, and the comparison with the out-of-fold accuracy; nothing when no
    grade is known. Patients the model trained on are left out: their grades are no new
    patient's (and are said to be)."""
    seen = seen_in_training(grader, results)
    lines = []
    if seen:
        lines.append(
            f"{len(seen)} graded patient(s) are in the model's training cohort (by id): their grades are not "
            "new-patient figures and are left out of the accuracy below"
        )
    graded = [
        r for r in results if r.p_hgg is not None and r.patient_id in truth and r.patient_id not in seen
    ]
    if not graded:
        return lines
    clean = [r for r in graded if not r.flagged]
    for who, group in (("graded", graded), ("graded and not flagged", clean)):
        if who != "graded" and len(group) == len(graded):
            continue
        if not group:
            lines.append(f"no {who} patient with a grade on disk")
            continue
        right = sum(r.prediction == truth[r.patient_id] for r in group)
        lo, hi = wilson_interval(right, len(group))
        lines.append(
            f"{right}/{len(group)} {who} patients match the grade on disk (95% CI {lo:.0%}-{hi:.0%})"
        )
    right = sum(r.prediction == truth[r.patient_id] for r in graded)
    return [*lines, compare_out_of_fold(grader, override, right, len(graded))]
