"""Does predict know when not to answer? Corrupted copies of new patients, graded by a model.

For each corruption of brats.data.phantom.CORRUPTIONS, every patient of PATIENTS is written
corrupted and graded with `--qc warn` (so that every patient gets both verdicts); the table gives
the share flagged by the input checks (QC warn or fail, or refused as unreadable), by the model's
own doubt (out of distribution or fold disagreement), and by either. The clean patients give the
false-flag rate.

    python bench/qc.py --model demo/run/model_ensemble.onnx
The new patients are the demo's (`make demo`: 20 patients, seed 2026, 120 x 120 x 78) written
afresh without the three the demo corrupts, so that the clean row is clean.
Goals: every hard-check corruption (skull on, thick slices, another grid, cut by the field of
view) caught 100%; swapped T1 and FLAIR >= 90%; clean patients flagged <= 5%.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from brats.data.cohort import MODALITIES, find_cases
from brats.data.phantom import CORRUPTIONS, corrupt, make_cohort, write_images
from brats.data.preprocess import read_image
from brats.deploy.inference import Grader

HARD = ("skull_on", "thick_slices", "other_grid", "cut_by_fov")


def write_corrupted(cases, kind: str, out: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for case in cases:
        images = [read_image(case, m) for m in MODALITIES]
        images = corrupt(images, kind, rng) if kind != "clean" else images
        write_images(out / kind / case.patient_id, case.patient_id, images)
    return out / kind


def shares(grader: Grader, folder: Path) -> tuple[int, float, float, float]:
    results = grader.grade(find_cases(folder, labelled=False).cases)
    qc = [r.error != "" or r.qc.status in ("warn", "fail") for r in results]
    doubt = [bool(r.doubt.reasons) for r in results]
    either = [a or b for a, b in zip(qc, doubt)]
    return len(results), float(np.mean(qc)), float(np.mean(doubt)), float(np.mean(either))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo/run/model_ensemble.onnx")
    ap.add_argument("--patients", type=int, default=20, help="new patients (never trained on)")
    ap.add_argument("--cohort-seed", type=int, default=2026, help="the demo's new patients' seed")
    ap.add_argument("--shape", type=int, nargs=3, default=(120, 120, 78))
    ap.add_argument("--seed", type=int, default=0, help="the corruptions' seed")
    args = ap.parse_args()
    grader = Grader(args.model, qc="warn")
    tmp = Path(tempfile.mkdtemp(prefix="bench-qc-"))
    try:
        make_cohort(tmp / "new", args.patients, args.cohort_seed, tuple(args.shape), "Brats18_NEW")
        cases = find_cases(tmp / "new", labelled=False).cases
        n_kinds = len(CORRUPTIONS)
        print(f"{args.model} on {len(cases)} patients (seed {args.cohort_seed}), corrupted {n_kinds} ways")
        print("| corruption | patients | flagged by QC | by the model's doubt | by either |")
        print("|---|---|---|---|---|")
        for kind in ("clean", *CORRUPTIONS):
            n, qc, doubt, either = shares(grader, write_corrupted(cases, kind, tmp, args.seed))
            label = f"{kind} (hard check)" if kind in HARD else kind
            print(f"| {label} | {n} | {qc:.0%} | {doubt:.0%} | {either:.0%} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
