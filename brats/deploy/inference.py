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
from brats.data.profile import profile_images
from brats.deploy.cam import write_case_maps
from brats.deploy.contract import (
    CAM_OUTPUT,
    CONTRACT_KEY,
    DISTANCE_OUTPUT,
    FOLDS_OUTPUT,
    PROVENANCE_KEY,
    Decision,
    check_graph_input,
)
from brats.deploy.doubt import Doubt, assess
from brats.deploy.qc import QC_MODES, QCResult, check_scan
from brats.errors import BratsError, CaseError


@dataclass(frozen=True)
class Prediction:
    patient_id: str
    p_hgg: float | None  # calibrated when the model's decision calibrates; None: not graded
    error: str = ""  # why this patient could not be graded
    threshold: float = 0.5  # HGG when p_hgg >= threshold
    cam_error: str = ""  # why its CAM was not written, though it was graded
    cam_flat: bool = False  # its CAM was written, and is one value over the brain (says nothing of where)
    qc: QCResult = QCResult("off")  # input quality control (brats.deploy.qc)
    doubt: Doubt = Doubt()  # the model's own doubt (brats.deploy.doubt)

    @property
    def flagged(self) -> bool:
        """Graded, but with a reason to distrust the grade."""
        return self.p_hgg is not None and (self.qc.status in ("warn", "fail") or bool(self.doubt.reasons))

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
        qc: str = "fail",
    ):
        import onnxruntime as ort

        model = Path(model)
        self.path = model
        if not model.is_file():
            raise BratsError(f"{model}: model file not found (make one with python export.py)")
        if not os.access(model, os.R_OK):
            raise BratsError(f"cannot read {model} (permission denied): check its permissions")
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
        outputs = {o.name for o in self.session.get_outputs()}
        self.has_cam = CAM_OUTPUT in outputs
        self.doubt_outputs = [n for n in (FOLDS_OUTPUT, DISTANCE_OUTPUT) if n in outputs]
        if qc not in QC_MODES:
            raise BratsError(f"--qc {qc!r}: choose one of {', '.join(QC_MODES)}")
        self.qc_mode = qc

    def check_cam(self) -> None:
        """Refuse, before any patient is read, to map a CAM the model does not compute."""
        if not self.has_cam:
            raise BratsError(
                f"{self.path}: its graph has no CAM output (exported before class activation maps "
                "were): export it again with python export.py to use --cam, or leave --cam out"
            )

    def run(self, batch: np.ndarray, cam: bool = False) -> dict[str, np.ndarray]:
        """(B, C, S, S, S) float32 -> the graph's outputs by name: probabilities (B, 2), the CAM on
        the cube (B, S, S, S) when asked, and the model's doubt outputs when it has them."""
        names = ["probabilities", *([CAM_OUTPUT] if cam else []), *self.doubt_outputs]
        if cam:
            self.check_cam()
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return dict(zip(names, self.session.run(names, {"input": x})))

    def quality(self, images: list[sitk.Image]) -> QCResult:
        """Input QC of one patient's scans (brats.deploy.qc), unless --qc off."""
        if self.qc_mode == "off":
            return QCResult("off")
        profile = profile_images(images)
        cube_voxel_mm = max(profile.extent_mm) / self.cfg.size  # what preprocessing resamples to
        return check_scan(profile, self.contract.get("profile"), cube_voxel_mm)

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
        pending: list[Pending] = []

        def report(i: int, prediction: Prediction) -> None:
            results[i] = prediction
            if on_result:
                on_result(prediction)

        def flush() -> None:
            if not pending:
                return
            out = self.run(np.stack([q.volume for q in pending]), cam=cam_dir is not None)
            p_hgg = self.decision.calibrate(out["probabilities"][:, 1].astype(np.float64))
            doubts = assess(
                out.get(FOLDS_OUTPUT), out.get(DISTANCE_OUTPUT), self.contract.get("doubt"), len(pending)
            )
            for j, (q, p) in enumerate(zip(pending, p_hgg)):
                graded = Prediction(
                    q.patient_id, float(p), threshold=self.threshold, qc=q.qc, doubt=doubts[j]
                )
                if cam_dir is not None and q.place is not None:
                    # the picture goes through the evidence for the grade predicted, at the model's threshold
                    error, flat = write_cam(cam_dir, graded, out[CAM_OUTPUT][j], q.place)
                    graded = replace(graded, cam_error=error, cam_flat=flat)
                report(q.position, graded)
            pending.clear()

        for i, case in enumerate(cases):
            queued = self.read(i, case, cam_dir is not None)
            if isinstance(queued, Prediction):
                report(i, queued)
                continue
            pending.append(queued)
            if len(pending) == batch_size:
                flush()
        flush()
        return [results[i] for i in sorted(results)]

    def read(self, i: int, case: Case, keep_flair: bool) -> Pending | Prediction:
        """One patient read, checked and preprocessed for the graph; or, when it cannot be graded
        (unreadable, or refused by QC), the Prediction that says why."""
        pid = case.patient_id
        try:
            images = [read_image(case, m) for m in MODALITIES]
            qc = self.quality(images)  # before the model runs, from the files as read
            if qc.status == "fail" and self.qc_mode == "fail":
                return Prediction(pid, None, threshold=self.threshold, qc=qc)
            volume, grid = preprocess_images(case, images, self.cfg)
        except CaseError as e:
            return Prediction(pid, None, e.reason, self.threshold)
        except Exception as e:  # one patient's unexpected failure must not stop the others
            return Prediction(pid, None, f"preprocessing failed ({type(e).__name__}: {e})", self.threshold)
        # with a CAM folder the FLAIR just read stays in memory: the map is drawn over it
        place = (grid, images[MODALITIES.index("flair")]) if keep_flair else None
        return Pending(position=i, patient_id=pid, volume=volume, place=place, qc=qc)


@dataclass(frozen=True, kw_only=True)
class Pending:
    """A patient preprocessed and waiting for its batch."""

    position: int  # in the input order
    patient_id: str
    volume: np.ndarray  # (C, S, S, S) float32
    place: tuple[CubeGrid, sitk.Image] | None  # the cube's grid and the FLAIR, for its CAM
    qc: QCResult


def write_cam(
    cam_dir: str | Path, graded: Prediction, cam: np.ndarray, place: tuple[CubeGrid, sitk.Image]
) -> tuple[str, bool]:
    """Write one graded patient's CAM files (brats.deploy.cam.write_case_maps), the picture
    through the evidence for the grade predicted at the model's threshold and titled with the
    patient, p(HGG) and grade; returns (why not, or "", whether the map is flat)."""
    grid, flair = place
    title = (
        f"{graded.patient_id}: p(HGG) {graded.p_hgg:.3f}, graded {graded.prediction} "
        f"(HGG when p >= {graded.threshold:.3g}); red: evidence for HGG, blue: for LGG"
    )
    try:
        *_, flat = write_case_maps(
            cam_dir, graded.patient_id, cam, grid, flair, graded.prediction == "HGG", title
        )
    except BratsError as e:
        return str(e), False
    except Exception as e:  # one patient's map must not stop the others
        return f"{type(e).__name__}: {str(e)[:200]}", False
    return "", flat
