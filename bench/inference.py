"""Per-patient CPU inference at 4x128^3, measured side by side in one run.

- predict: read + preprocess + onnxruntime for one real-size patient (what predict.py does), as a
  ratio to (SimpleITK decode of the same files + onnxruntime alone)   (goal <= 1.3x);
- onnxruntime vs torch eager on the same model and input, batch 1    (goal <= 0.9x);
- predict with --cam (the map onto the patient's FLAIR grid as .nii.gz, and the PNG) vs predict
  without it, same patient and model                                   (goal <= 1.3x).

    python bench/inference.py [--layout strided] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import SimpleITK as sitk
import torch

from brats.data.cohort import find_cases
from brats.data.phantom import make_cohort
from brats.data.preprocess import PreprocessConfig, preprocess_case
from brats.deploy.inference import CONTRACT_KEY, Grader
from brats.evaluation.export import write_onnx
from brats.models.explained import ExplainedModel
from brats.models.resnet import ResNet3D


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--layout", default="strided")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-inf-"))
    try:
        make_cohort(tmp / "cohort", 2, seed=0)  # real size: 240x240x155 int16
        case = find_cases(tmp / "cohort").cases[0]
        cfg = PreprocessConfig(size=args.size)
        x = preprocess_case(case, cfg)[None]  # (1, 4, S, S, S)
        torch.manual_seed(0)
        wrapper = ExplainedModel([ResNet3D(args.depth, 4, layout=args.layout).eval()]).eval()
        contract = cfg.to_contract()
        model = tmp / "model.onnx"
        t0 = time.perf_counter()
        write_onnx(wrapper, np.concatenate([x, x, x]), model, {CONTRACT_KEY: contract})
        print(f"export (TorchScript exporter + checker + parity): {time.perf_counter() - t0:.1f} s")
        grader = Grader(model)
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        torch_model = wrapper
        t_dec, t_ort, t_torch, t_pred, t_cam = [], [], [], [], []
        for _ in range(args.repeats):  # interleaved, so that machine noise hits every path alike
            t0 = time.perf_counter()
            for p in case.paths:
                sitk.ReadImage(str(p))
            t1 = time.perf_counter()
            session.run(["probabilities"], {"input": x})
            t2 = time.perf_counter()
            with torch.no_grad():
                torch_model(torch.from_numpy(x))
            t3 = time.perf_counter()
            grader.grade([case])
            t4 = time.perf_counter()
            (mapped,) = grader.grade([case], cam_dir=tmp / "cams")
            t5 = time.perf_counter()
            if mapped.cam_error:
                raise SystemExit(f"predict --cam failed: {mapped.cam_error}")
            t_dec.append(t1 - t0)
            t_ort.append(t2 - t1)
            t_torch.append(t3 - t2)
            t_pred.append(t4 - t3)
            t_cam.append(t5 - t4)
        med = statistics.median
        print(
            f"ResNet-{args.depth} {args.layout} at 4x{args.size}^3, batch 1, "
            f"{torch.get_num_threads()} threads: "
            f"decode {med(t_dec):.3f} s, onnxruntime {med(t_ort):.3f} s, torch eager {med(t_torch):.3f} s, "
            f"predict (read+preprocess+onnxruntime) {med(t_pred):.3f} s, predict --cam {med(t_cam):.3f} s"
        )
        print(
            f"predict / (decode + onnxruntime): {med(t_pred) / (med(t_dec) + med(t_ort)):.2f}x (goal <= 1.3x)"
        )
        print(f"onnxruntime / torch eager: {med(t_ort) / med(t_torch):.2f}x (goal <= 0.9x)")
        print(f"predict --cam / predict: {med(t_cam) / med(t_pred):.2f}x (goal <= 1.3x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
