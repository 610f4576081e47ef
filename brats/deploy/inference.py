"""Grade new patients with an exported ONNX model: onnxruntime plus the training preprocessing.

No torch here. The preprocessing is driven by the contract stored in the model; a contract this
code does not know (another preprocessing version) is refused rather than silently approximated.
With a CAM folder, each patient's class activation map (the graph's `cam` output) is mapped back
onto the patient's own FLAIR grid and written beside a picture of it (brats.deploy.cam).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brats.data.cohort import CLASSES, MODALITIES, Case
from brats.data.preprocess import CubeGrid, PreprocessConfig, preprocess_images, read_image
from brats.deploy.cam import write_case_maps
from brats.deploy.contract import CAM_OUTPUT, CONTRACT_KEY, PROVENANCE_KEY, Decision, check_graph_input
from brats.errors import BratsError, CaseError


@dataclass(frozen=True)
class Prediction:
    patient_id: str
    p_hgg: float | None  # calibrated when the model's decision calibrates
    error: str = ""  # why this patient could not be graded
    threshold: float = 0.5  # HGG when p_hgg >= threshold
    cam_error: str = ""  # why its CAM was not written, though it was graded

    @property
    def p_lgg(self) -> float | None:
        return None if self.p_hgg is None else 1.0 - self.p_hgg

    @property
    def prediction(self) -> str:
        return "" if self.p_hgg is None else CLASSES[int(self.p_hgg >= self.threshold)]


DEVICES = ("cpu", "cuda")


def execution_providers(device: str, available: list[str]) -> list[str]:
    """onnxruntime's providers for --device: CUDA (falling back to the CPU for operators it lacks)
    or the CPU. Without a CUDA build, one line says what to install."""
    if device not in DEVICES:
        raise BratsError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise BratsError(
            "--device cuda: this onnxruntime has no CUDA provider (it has "
            f"{', '.join(available)}): pip uninstall onnxruntime && pip install onnxruntime-gpu, "
            "or leave --device out to grade on the CPU"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class Grader:
    """An onnxruntime session and the preprocessing contract of one exported model."""

    def __init__(
        self,
        model: str | Path,
        threads: int | None = None,
        threshold: float | None = None,
        device: str = "cpu",
    ):
        import onnxruntime as ort

        model = Path(model)
        if not model.is_file():
            raise BratsError(f"{model}: model file not found (make one with python export.py)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        providers = execution_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=providers)
        except Exception as e:
            raise BratsError(
                f"{model}: not a loadable ONNX model ({type(e).__name__}: {str(e)[:200]})"
            ) from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONTRACT_KEY not in meta:
            raise BratsError(
                f"{model}: no preprocessing contract in its metadata: export it with python export.py"
            )
        try:
            self.contract = json.loads(meta[CONTRACT_KEY])
        except json.JSONDecodeError as e:
            raise BratsError(
                f"{model}: its preprocessing contract is not valid JSON ({e}): export it again with "
                "python export.py"
            ) from e
        self.cfg = PreprocessConfig.from_contract(self.contract, model)
        try:  # where the model came from and its cross-validation figures; informative only
            self.provenance = json.loads(meta.get(PROVENANCE_KEY, "{}"))
        except json.JSONDecodeError:
            self.provenance = {}
        # Models exported before the decision was part of the contract: raw p(HGG), threshold 0.5.
        self.decision = Decision.from_dict(self.contract.get("decision", {}), model)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise BratsError(f"--threshold {threshold}: give a probability between 0 and 1")
        self.threshold = self.decision.threshold if threshold is None else threshold
        # Checked here, before any patient is read: a graph traced at another size fails only
        # at the first onnxruntime call otherwise.
        check_graph_input(
            self.session.get_inputs()[0].shape, self.cfg, model, "export it again with python export.py"
        )
        self.model = model
        self.has_cam = CAM_OUTPUT in {o.name for o in self.session.get_outputs()}

    def check_cam(self) -> None:
        """Refuse, before any patient is read, to map a CAM the model does not compute."""
        if not self.has_cam:
            raise BratsError(
                f"{self.model}: its graph has no CAM output (exported before class activation maps "
                "were): export it again with python export.py to use --cam, or leave --cam out"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, S, S, S) float32 -> p(HGG) (B,)."""
        probs = self.session.run(["probabilities"], {"input": np.ascontiguousarray(batch, dtype=np.float32)})[
            0
        ]
        return probs[:, 1].astype(np.float64)

    def run_with_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, S, S, S) float32 -> p(HGG) (B,) and the CAM on the cube (B, S, S, S) float32."""
        self.check_cam()
        x = np.ascontiguousarray(batch, dtype=np.float32)
        probs, cams = self.session.run(["probabilities", CAM_OUTPUT], {"input": x})
        return probs[:, 1].astype(np.float64), cams

    def grade(
        self,
        cases: Iterable[Case],
        batch_size: int = 4,
        on_result: Callable[[Prediction], None] | None = None,
        cam_dir: str | Path | None = None,
    ) -> list[Prediction]:
        """Preprocess and grade each patient, in input order; a patient that fails is reported
        with its reason and the others go on. With `cam_dir`, each graded patient's CAM is
        written there as <id>_cam.nii.gz on the FLAIR's grid and <id>_cam.png (brats.deploy.cam); a map
        that cannot be written is reported in `cam_error` and the others go on."""
        if batch_size < 1:
            raise BratsError(f"batch size {batch_size}: give at least 1 patient per onnxruntime call")
        if cam_dir is not None:
            self.check_cam()
        results: dict[int, Prediction] = {}
        # (input position, patient, preprocessed volume, and for its CAM: the cube grid and FLAIR)
        pending: list[tuple[int, str, np.ndarray, tuple[CubeGrid, sitk.Image] | None]] = []

        def report(i: int, prediction: Prediction) -> None:
            results[i] = prediction
            if on_result:
                on_result(prediction)

        def flush() -> None:
            if not pending:
                return
            batch = np.stack([v for _, _, v, _ in pending])
            raw, cams = self.run_with_cam(batch) if cam_dir is not None else (self.run(batch), None)
            for j, ((i, pid, _, place), p) in enumerate(zip(pending, self.decision.calibrate(raw))):
                graded = Prediction(pid, float(p), threshold=self.threshold)
                if cams is not None and place is not None:  # place is kept for every patient with a cam_dir
                    # the picture goes through the evidence for the grade predicted, at the model's threshold
                    error = write_cam(cam_dir, pid, cams[j], place, toward_hgg=graded.prediction == "HGG")
                    graded = replace(graded, cam_error=error)
                report(i, graded)
            pending.clear()

        for i, case in enumerate(cases):
            try:
                images = [read_image(case, m) for m in MODALITIES]
                volume, grid = preprocess_images(case, images, self.cfg)
                # with a CAM folder the FLAIR just read stays in memory: the map is drawn over it
                place = (grid, images[MODALITIES.index("flair")]) if cam_dir is not None else None
            except CaseError as e:
                report(i, Prediction(case.patient_id, None, e.reason, self.threshold))
                continue
            except Exception as e:  # one patient's unexpected failure must not stop the others
                reason = f"preprocessing failed ({type(e).__name__}: {e})"
                report(i, Prediction(case.patient_id, None, reason, self.threshold))
                continue
            pending.append((i, case.patient_id, volume, place))
            if len(pending) == batch_size:
                flush()
        flush()
        return [results[i] for i in sorted(results)]


def write_cam(
    cam_dir: str | Path,
    patient_id: str,
    cam: np.ndarray,
    place: tuple[CubeGrid, sitk.Image],
    toward_hgg: bool,
) -> str:
    """Write one patient's CAM files (brats.cam.write_case_maps); returns why not, or ""."""
    grid, flair = place
    try:
        write_case_maps(cam_dir, patient_id, cam, grid, flair, toward_hgg)
    except BratsError as e:
        return str(e)
    except Exception as e:  # one patient's map must not stop the others
        return f"{type(e).__name__}: {str(e)[:200]}"
    return ""
