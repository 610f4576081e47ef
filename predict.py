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

import sys
from pathlib import Path
from typing import Annotated

import typer

from brats.data.cohort import CLASSES
from brats.deploy.cam import cam_path, png_path
from brats.deploy.inference import Grader, Prediction
from brats.deploy.report import (
    CSV_FIELDS,
    accuracy_lines,
    csv_rows,
    describe_model,
    gather_cases,
    is_predictions_csv,
    protected_paths,
    seen_in_training,
    summary_line,
    table_lines,
)
from brats.errors import BratsError, command_app, exit_on_error, finished, run_cli
from brats.io.atomic import (
    check_output_dir,
    check_output_file,
    refuse_inputs,
    refuse_other_kind,
    write_csv_atomic,
)

app = command_app(__doc__)


@app.command()
@exit_on_error
def main(
    model: Annotated[Path, typer.Argument(readable=False, help="exported .onnx model")],
    inputs: Annotated[
        list[Path] | None, typer.Argument(readable=False, help="patient folders or cohort roots")
    ] = None,
    out: Annotated[Path, typer.Option(help="CSV to write")] = Path("predictions.csv"),
    t1: Annotated[
        Path | None, typer.Option(readable=False, help="one patient's T1 file [default: none]")
    ] = None,
    t1ce: Annotated[Path | None, typer.Option(readable=False, help="... T1ce file [default: none]")] = None,
    t2: Annotated[Path | None, typer.Option(readable=False, help="... T2 file [default: none]")] = None,
    flair: Annotated[Path | None, typer.Option(readable=False, help="... FLAIR file [default: none]")] = None,
    patient_id: Annotated[
        str, typer.Option("--id", help="patient id for --t1/--t1ce/--t2/--flair")
    ] = "patient",
    batch_size: Annotated[int, typer.Option(help="patients per onnxruntime call")] = 4,
    threads: Annotated[int, typer.Option(help="onnxruntime CPU threads (0: all cores)")] = 0,
    device: Annotated[str, typer.Option(help="cpu, or cuda (needs onnxruntime-gpu)")] = "cpu",
    qc: Annotated[
        str,
        typer.Option(
            help="input checks: fail (refuse non-BraTS-space patients), warn (grade them, flagged), off"
        ),
    ] = "fail",
    threshold: Annotated[
        float | None, typer.Option(help="HGG when p_hgg >= this [default: the model's, chosen at evaluation]")
    ] = None,
    cam: Annotated[
        Path | None,
        typer.Option(
            help="folder for each patient's class activation map (<id>_cam.nii.gz, <id>_cam.png) "
            "[default: none]"
        ),
    ] = None,
) -> None:
    if batch_size < 1:
        raise BratsError(f"--batch-size {batch_size}: give at least 1 patient per onnxruntime call")
    if threads < 0:
        raise BratsError(f"--threads {threads}: give a number of threads, or 0 for all cores")
    # Before any patient is read: grading a cohort and then failing to write its results loses them.
    check_output_file(out, "--out")
    replacing = out.is_file()
    grader = Grader(model, threads or None, threshold, device, qc)
    if cam is not None:
        grader.check_cam()
        check_output_dir(cam, "--cam")
    explicit = {"t1": t1, "t1ce": t1ce, "t2": t2, "flair": flair}
    if any(explicit.values()) and not patient_id.strip():
        raise BratsError("--id is empty: give the patient an id (it names the CSV row and the CAM files)")
    cases, problems, repeated = gather_cases(inputs or [], explicit, patient_id)
    # Still before any patient is read: no output may replace what this command reads.
    protected = protected_paths(model, inputs or [], cases)
    refuse_inputs(out, protected, "--out")
    refuse_other_kind(out, is_predictions_csv, "a predictions CSV", "--out")
    if cam is not None:
        refuse_inputs(cam, protected, "--cam")
        for case in cases:  # a map's file name is the patient's: it must not be an input either
            for path in (cam_path(cam, case.patient_id), png_path(cam, case.patient_id)):
                refuse_inputs(path, protected, f"{case.patient_id}'s map")
    for pid, n in sorted(repeated.items()):
        print(f"{pid}: given {n} times, graded once")
    print(
        f"{model}: {len(cases) + len(problems)} patient(s), "
        f"input {grader.cfg.size}^3 {','.join(grader.cfg.modalities)}"
    )
    print(describe_model(grader, threshold))
    results = grader.grade(cases, batch_size, cam_dir=cam)
    results += [Prediction(e.patient_id, None, e.reason, grader.threshold) for e in problems]
    write_csv_atomic(out, csv_rows(results, seen_in_training(grader, results)), CSV_FIELDS)
    # Grades found in a labelled layout are shown beside the prediction (not written to the CSV).
    truth = {c.patient_id: CLASSES[c.label] for c in cases if c.label is not None}
    print("\n".join(table_lines(results, truth) + accuracy_lines(grader, results, truth, threshold)))
    failed = [r for r in results if r.error]
    replaced = " (replaced the previous file)" if replacing else ""
    print(f"wrote {out}{replaced}: {summary_line(results)}")
    no_cam = [r for r in results if r.cam_error]
    if cam is not None:
        mapped = sum(r.p_hgg is not None for r in results) - len(no_cam)
        print(
            f"wrote {mapped} class activation map(s) to {cam} (<id>_cam.nii.gz over the FLAIR, <id>_cam.png)"
        )
        flat = [r.patient_id for r in results if r.cam_flat]
        if flat:
            print(
                f"{len(flat)} of the maps are flat (one value over the brain: they show nothing about where; "
                "the model's last feature map is a single cell at its input size: a cache prepared at a "
                "larger --size, or the medicalnet layout, gives maps that localise): "
                + ", ".join(flat[:5])
                + (" ..." if len(flat) > 5 else "")
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
    if cam is None:
        finished([], "add --cam DIR to see where the model looked (a picture and a NIfTI map per patient)")


if __name__ == "__main__":
    run_cli(app)
