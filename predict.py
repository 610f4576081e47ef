"""Grade new patients with an exported ONNX model, on the CPU, without PyTorch.

    python predict.py runs/cv/model.onnx NEW_PATIENTS/ [MORE...] [--out predictions.csv]
    python predict.py model.onnx --t1 a_t1.nii.gz --t1ce a_t1ce.nii.gz --t2 a_t2.nii.gz --flair a_flair.nii.gz
    python predict.py runs/cv/model.onnx NEW_PATIENTS/ --cam cams/   # and where the model looked

Each INPUT is one patient folder or a cohort root in any supported layout (BraTS 2018/2019,
2020, CSV manifest, or a folder of patient folders). Writes patient_id,p_hgg,p_lgg,prediction,
threshold,error and prints a table; p_hgg is calibrated and the threshold is the one chosen on the
out-of-fold predictions when the model was evaluated that way (--threshold overrides it).
Patients that cannot be graded are listed with the reason (exit status 1); every other patient is
still graded. A patient given twice is graded once. The output path is
checked before any patient is read; an existing CSV is replaced atomically.

--cam DIR writes, per patient, DIR/<id>_cam.nii.gz: the class activation map (HGG evidence per
voxel, > 0 toward HGG) on the grid of the patient's own FLAIR, to overlay on it in ITK-SNAP or
3D Slicer; and DIR/<id>_cam.png: three planes through its peak over the FLAIR. A map that cannot
be written is reported (exit status 1) and the other patients' maps are still written.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from brats.atomic import check_output_dir, check_output_file, write_csv_atomic
from brats.cohort import CLASSES, MODALITIES, Case, find_cases
from brats.errors import BratsError, CaseError, exit_on_error, run_cli
from brats.inference import Grader, Prediction

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


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
    unique_problems = {(e.patient_id, e.reason): e for e in problems}
    times.update(e.patient_id for e in problems)
    repeated = {pid: n for pid, n in times.items() if n > 1}
    return list(unique.values()), list(unique_problems.values()), repeated


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound for the few patients of a check)."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def compare_out_of_fold(grader: Grader, override: float | None, lo: float, hi: float) -> str:
    """One line setting the new patients' accuracy beside the model's out-of-fold accuracy at the
    same decision, and whether the two agree within the new patients' CI."""
    cv = grader.provenance.get("cv_summary") or {}
    point = (cv.get("calibration") or {}).get("operating_point")
    if not point:
        return "out-of-fold accuracy: not in this model's metadata (export it again to compare)"
    n = (cv.get("pooled") or {}).get("n", "?")
    if override is not None and override != grader.decision.threshold:
        return (
            f"out-of-fold accuracy {point['accuracy']:.2f} over {n} patients was measured at threshold "
            f"{grader.decision.threshold:.4g}, not at --threshold {override:g}"
        )
    acc, ensemble = point["accuracy"], bool(grader.provenance.get("ensemble"))
    reasons = ["these patients differ from the cross-validation cohort"]
    if cv.get("optimistic"):
        reasons.append(
            "the out-of-fold figure is optimistic (each fold's epoch was chosen on the patients scored)"
        )
    if ensemble:
        reasons.append(
            "the decision was fitted on each fold model's probabilities, and the ensemble averages them"
        )
    verdict = (
        "inside the new patients' 95% CI: the two agree"
        if lo <= acc <= hi
        else "outside the new patients' 95% CI: more than chance separates the two (either "
        + ", or ".join(reasons)
        + ")"
    )
    who = "the fold models this ensemble averages" if ensemble else "the fold models"
    return (
        f"out-of-fold ({who}, each on patients it never trained on) at the same decision: "
        f"accuracy {acc:.2f} (sensitivity {point['sensitivity']:.2f}, "
        f"specificity {point['specificity']:.2f}) over {n} patients, {verdict}"
    )


def describe_decision(grader: Grader, override: float | None) -> str:
    """One line: how p_hgg is calibrated and where the threshold came from."""
    d = grader.decision
    if d.calibration == "temperature":
        cal = f"p_hgg calibrated by temperature {1 / d.slope:.4g}"
    elif d.calibration == "platt":
        cal = f"p_hgg calibrated by Platt scaling (a {d.slope:.4g}, b {d.intercept:.4g})"
    else:
        cal = "p_hgg as the model gives it (not calibrated)"
    source = "--threshold" if override is not None else f"the model's, rule {d.rule}"
    return f"{cal}; HGG when p_hgg >= {grader.threshold:.4g} ({source})"


@app.command()
@exit_on_error
def main(
    model: Annotated[Path, typer.Argument(help="exported .onnx model")],
    inputs: Annotated[list[Path] | None, typer.Argument(help="patient folders or cohort roots")] = None,
    out: Annotated[Path, typer.Option(help="CSV to write")] = Path("predictions.csv"),
    t1: Annotated[Path | None, typer.Option(help="one patient's T1 file")] = None,
    t1ce: Annotated[Path | None, typer.Option(help="... T1ce file")] = None,
    t2: Annotated[Path | None, typer.Option(help="... T2 file")] = None,
    flair: Annotated[Path | None, typer.Option(help="... FLAIR file")] = None,
    patient_id: Annotated[
        str, typer.Option("--id", help="patient id for --t1/--t1ce/--t2/--flair")
    ] = "patient",
    batch_size: Annotated[int, typer.Option(help="patients per onnxruntime call")] = 4,
    threads: Annotated[int, typer.Option(help="onnxruntime threads [all cores]")] = 0,
    threshold: Annotated[
        float | None, typer.Option(help="HGG when p_hgg >= this [the model's, chosen at evaluation]")
    ] = None,
    cam: Annotated[
        Path | None,
        typer.Option(help="folder for each patient's class activation map (<id>_cam.nii.gz, <id>_cam.png)"),
    ] = None,
) -> None:
    if batch_size < 1:
        raise BratsError(f"--batch-size {batch_size}: give at least 1 patient per onnxruntime call")
    if threads < 0:
        raise BratsError(f"--threads {threads}: give a number of threads, or 0 for all cores")
    # Before any patient is read: grading a cohort and then failing to write its results loses them.
    check_output_file(out, "--out")
    replacing = out.is_file()
    grader = Grader(model, threads or None, threshold)
    if cam is not None:
        grader.check_cam()
        check_output_dir(cam, "--cam")
    cases, problems, repeated = gather_cases(
        inputs or [], {"t1": t1, "t1ce": t1ce, "t2": t2, "flair": flair}, patient_id
    )
    for pid, n in sorted(repeated.items()):
        print(f"{pid}: given {n} times, graded once")
    print(
        f"{model}: {len(cases) + len(problems)} patient(s), "
        f"input {grader.cfg.size}^3 {','.join(grader.cfg.modalities)}"
    )
    print(describe_decision(grader, threshold))
    results = grader.grade(cases, batch_size, cam_dir=cam)
    results += [Prediction(e.patient_id, None, e.reason, grader.threshold) for e in problems]
    rows = [
        {
            "patient_id": r.patient_id,
            "p_hgg": "" if r.p_hgg is None else f"{r.p_hgg:.6f}",
            "p_lgg": "" if r.p_lgg is None else f"{r.p_lgg:.6f}",
            "prediction": r.prediction,
            "threshold": f"{r.threshold:.6g}",
            "error": r.error,
        }
        for r in results
    ]
    write_csv_atomic(out, rows, ["patient_id", "p_hgg", "p_lgg", "prediction", "threshold", "error"])
    # Grades found in a labelled layout are shown beside the prediction (not written to the CSV).
    truth = {c.patient_id: CLASSES[c.label] for c in cases if c.label is not None}
    width = max([len(r["patient_id"]) for r in rows] + [10])
    print(f"{'patient':<{width}}  {'p_hgg':>8}  prediction" + ("  grade on disk" if truth else ""))
    for r in rows:
        known = f"  {truth.get(r['patient_id'], '')}" if truth else ""
        print(f"{r['patient_id']:<{width}}  {r['p_hgg'] or '-':>8}  {r['prediction'] or 'FAILED':<10}{known}")
    graded = [r for r in results if r.p_hgg is not None and r.patient_id in truth]
    if graded:
        right = sum(r.prediction == truth[r.patient_id] for r in graded)
        lo, hi = wilson_interval(right, len(graded))
        print(f"{right}/{len(graded)} graded patients match the grade on disk (95% CI {lo:.0%}-{hi:.0%})")
        print(compare_out_of_fold(grader, threshold, lo, hi))
    failed = [r for r in results if r.error]
    replaced = " (replaced the previous file)" if replacing else ""
    print(f"wrote {out}{replaced}: {len(results) - len(failed)} graded, {len(failed)} failed")
    no_cam = [r for r in results if r.cam_error]
    if cam is not None:
        mapped = len(results) - len(failed) - len(no_cam)
        print(
            f"wrote {mapped} class activation map(s) to {cam} (<id>_cam.nii.gz over the FLAIR, <id>_cam.png)"
        )
    if failed:
        print(f"{len(failed)} patient(s) could not be graded:", file=sys.stderr)
        for r in failed:
            print(f"  {r.patient_id}: {r.error}", file=sys.stderr)
    if no_cam:
        print(f"{len(no_cam)} patient(s) graded, but their CAM was not written:", file=sys.stderr)
        for r in no_cam:
            print(f"  {r.patient_id}: {r.cam_error}", file=sys.stderr)
    if failed or no_cam:
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(app)
