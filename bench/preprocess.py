"""Preprocessing speed, as ratios measured side by side in one run.

1. per patient, single-threaded, each against SimpleITK's plain decode of the same 4 files:
   - verified read (inflate once, CRC + length checks, voxels from those bytes), with the gzip
     library in use (ISA-L when installed) and with zlib;
   - full preprocess including the verified read (goal <= 2.0);
2. whole cohort: 1 worker / N workers wall time (goal >= 1.8x on 2 cores).

    python bench/preprocess.py [--patients 8] [--size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import SimpleITK as sitk

import brats.io.compression as pre
from brats.data.cache_builder import prepare
from brats.data.cohort import MODALITIES, find_cases
from brats.data.phantom import make_cohort
from brats.data.preprocess import PreprocessConfig, preprocess_case, read_image


def seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def decode(case) -> None:
    for p in case.paths:
        sitk.ReadImage(str(p))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pre-"))
    backend = pre.ZLIB_MODULE
    try:
        make_cohort(tmp / "cohort", args.patients, seed=0)  # real size: 240x240x155 int16
        cases = find_cases(tmp / "cohort").cases
        cfg = PreprocessConfig(size=args.size)
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)

        def read_all(case, module) -> None:
            pre.ZLIB_MODULE = module
            try:
                for m in MODALITIES:
                    read_image(case, m)
            finally:
                pre.ZLIB_MODULE = backend

        times: dict[str, list[float]] = {k: [] for k in ("decode", "verified", "verified_zlib", "preprocess")}
        for case in cases:
            for _ in range(args.repeats):  # interleave so that machine noise hits all alike
                times["decode"].append(seconds(decode, case))
                times["verified"].append(seconds(read_all, case, backend))
                times["verified_zlib"].append(seconds(read_all, case, zlib))
                times["preprocess"].append(seconds(preprocess_case, case, cfg))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {
            k: statistics.median(a / d for a, d in zip(times[k], times["decode"]))
            for k in ("verified", "verified_zlib", "preprocess")
        }
        print(f"decode only (4 files, SimpleITK, 1 thread, no CRC check): {med['decode']:.3f} s/patient")
        print(
            f"verified read ({backend.__name__}): {med['verified']:.3f} s/patient, "
            f"{ratio['verified']:.2f}x decode"
        )
        if backend is not zlib:
            print(
                f"verified read (zlib):             {med['verified_zlib']:.3f} s/patient, "
                f"{ratio['verified_zlib']:.2f}x decode"
            )
        print(
            f"preprocess incl. verified read ({backend.__name__}): {med['preprocess']:.3f} s/patient, "
            f"{ratio['preprocess']:.2f}x decode (goal <= 2.0)"
        )

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
