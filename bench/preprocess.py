"""Preprocessing speed, as ratios measured side by side in one run.

1. per patient, single-threaded: preprocess time / SimpleITK decode time of the same 4 files
   (goal <= 2.0);
2. whole cohort: 1 worker / N workers wall time (goal >= 1.8x on 2 cores).

    python bench/preprocess.py [--patients 8] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from brats.cache import prepare
from brats.cohort import find_cases
from brats.preprocess import PreprocessConfig, preprocess_case
from brats.synthetic import make_cohort


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pre-"))
    try:
        make_cohort(tmp / "cohort", args.patients, seed=0)  # real size: 240x240x155 int16
        cases = find_cases(tmp / "cohort").cases
        cfg = PreprocessConfig(size=args.size)
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
        ratios, pre_s, dec_s = [], [], []
        for case in cases:
            for _ in range(args.repeats):  # interleave so that machine noise hits both alike
                t0 = time.perf_counter()
                for p in case.paths:
                    sitk.ReadImage(str(p))
                t1 = time.perf_counter()
                preprocess_case(case, cfg)
                t2 = time.perf_counter()
                dec_s.append(t1 - t0)
                pre_s.append(t2 - t1)
                ratios.append((t2 - t1) / (t1 - t0))
        print(f"decode (4 files, SimpleITK, 1 thread): median {statistics.median(dec_s):.3f} s/patient")
        print(f"preprocess incl. decode (1 thread):    median {statistics.median(pre_s):.3f} s/patient")
        print(f"ratio preprocess/decode: median {statistics.median(ratios):.2f} (goal <= 2.0)")

        workers = os.cpu_count() or 1
        wall = {}
        for n in (1, workers):
            shutil.rmtree(tmp / "cache", ignore_errors=True)
            t0 = time.perf_counter()
            prepare(cases, tmp / "cache", cfg, workers=n, progress=False)
            wall[n] = time.perf_counter() - t0
        print(
            f"prepare {len(cases)} patients: 1 worker {wall[1]:.2f} s, "
            f"{workers} workers {wall[workers]:.2f} s, "
            f"speed-up {wall[1] / wall[workers]:.2f}x (goal >= 1.8x on 2 cores)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
