"""Export the verified best model (or every fold as one ensemble) to ONNX for CPU inference.

The checkpoint is chosen with evaluate.py's policy (best EMA first) and loaded into a freshly
built model (never a prepared/compiled module). The graph takes float32 (B, C, S, S, S) with a
dynamic batch axis and returns `probabilities` (B, 2) [p(LGG), p(HGG)] and `logits` (B, 2); an
ensemble averages the folds' softmax probabilities (and their logits). The preprocessing
contract and the provenance travel in the ONNX metadata and in model_card.json beside the model.
Export fails, leaving nothing behind, unless onnxruntime matches torch within 1e-4.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from brats.atomic import atomic_path, write_json_atomic
from brats.cache import open_data
from brats.cohort import CLASSES
from brats.errors import BratsError
from brats.evaluation import evaluate_run, load_best_model, model_config, run_config
from brats.inference import CONTRACT_KEY, PROVENANCE_KEY
from brats.preprocess import PreprocessConfig
from brats.runs import RunPaths

log = logging.getLogger(__name__)

OPSET = {"torchscript": 17, "dynamo": 18}  # set explicitly per exporter
EXPORTERS = tuple(OPSET)
PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch|


class Exported(nn.Module):
    """One model or an ensemble: (B, C, S, S, S) -> (probabilities, logits), both (B, 2)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.stack([m(x) for m in self.models])  # (M, B, 2)
        return torch.softmax(logits, dim=-1).mean(0), logits.mean(0)


def load_fold(run: Path, k: int, run_cfg: dict, trust: bool) -> tuple[nn.Module, dict]:
    """Fold k's model by evaluate.py's policy, and where it came from."""
    model, ckpt, path = load_best_model(run, k, run_cfg, trust)
    info = {
        "fold": k,
        "checkpoint": str(path),
        "is_ema": bool(ckpt.get("is_ema", False)),
        "epoch": int(ckpt.get("epoch", -1)),
        "stored_val_auc": float(ckpt["val_metrics"].get("auc", float("nan"))),
        "preprocess": ckpt.get("preprocess"),
        "config": model_config(ckpt, run_cfg),
    }
    return model, info


def check_parity(path: Path, model: nn.Module, inputs: np.ndarray) -> float:
    """max |p_onnx - p_torch| on `inputs` at batch 1 and 3 (onnxruntime on the CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 3):
        x = np.ascontiguousarray(inputs[:batch])
        with torch.no_grad():
            p_torch = model(torch.from_numpy(x))[0].numpy()
        p_onnx = session.run(["probabilities"], {"input": x})[0]
        if p_onnx.shape != p_torch.shape:
            raise BratsError(f"ONNX output shape {p_onnx.shape} at batch {batch}, torch {p_torch.shape}")
        worst = max(worst, float(np.abs(p_onnx - p_torch).max()))
    return worst


def write_onnx(
    wrapper: Exported, inputs: np.ndarray, out: Path, metadata: dict[str, dict], exporter: str = "torchscript"
) -> float:
    """Export `wrapper` to `out` atomically: dynamic batch, metadata as JSON strings, full
    checker, and parity against torch on `inputs` (>= 3 samples); returns the max |dp|.

    `torchscript` (default) is ~3x faster to export here; `dynamo` is the exporter PyTorch
    develops further. Both are traced with a batch of 2 and a dynamic batch axis, since the
    dynamo exporter would fix a batch of 1 traced with 1.
    """
    if exporter not in EXPORTERS:
        raise BratsError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        how = {"dynamo": True, "dynamic_shapes": {"x": {0: batch}}, "external_data": False}
    else:
        axes = {"input": {0: "batch"}, "probabilities": {0: "batch"}, "logits": {0: "batch"}}
        how = {"dynamo": False, "dynamic_axes": axes}
    with atomic_path(out) as tmp:
        torch.onnx.export(
            wrapper,
            (torch.from_numpy(inputs[:2]),),
            str(tmp),
            opset_version=OPSET[exporter],
            input_names=["input"],
            output_names=["probabilities", "logits"],
            **how,
        )
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        proto.producer_name = "brats"
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        worst = check_parity(tmp, wrapper, inputs)
        if not worst <= PARITY_TOLERANCE:
            raise BratsError(
                f"ONNX parity failed: max |p_onnx - p_torch| = {worst:.2e} > {PARITY_TOLERANCE:g}; "
                "nothing written"
            )
    return worst


def export(
    run: str | Path,
    out: str | Path | None = None,
    fold: int | None = None,
    ensemble: bool = False,
    trust: bool = False,
    exporter: str = "torchscript",
) -> Path:
    """Write the ONNX model and model_card.json; returns the model path."""
    run = Path(run)
    run_cfg = run_config(run)
    summary_path = RunPaths(run).summary
    if not summary_path.is_file():
        log.info(f"{summary_path} missing: evaluating the run first")
        evaluate_run(run, trust=trust)
    summary = json.loads(summary_path.read_text())
    evaluated = {row["fold"]: row for row in summary["folds"]}
    if ensemble:
        folds = sorted(evaluated)
    elif fold is not None:
        if fold not in evaluated:
            raise BratsError(f"--fold {fold}: not in {summary_path} (evaluated folds {sorted(evaluated)})")
        folds = [fold]
    else:  # the fold whose re-scored validation AUC is best
        folds = [max(evaluated.values(), key=lambda r: (r["rescored_val_auc"], -r["fold"]))["fold"]]

    models, sources = [], []
    for k in folds:
        model, info = load_fold(run, k, run_cfg, trust)
        info["rescored_val_auc"] = evaluated[k]["rescored_val_auc"]
        models.append(model)
        sources.append(info)
        log.info(
            f"fold {k}: {info['checkpoint']} (epoch {info['epoch']}, "
            f"re-scored val AUC {info['rescored_val_auc']:.4f})"
        )
    cfgs = {json.dumps({k: s["config"][k] for k in ("modalities",)}) for s in sources}
    preps = {json.dumps(s["preprocess"], sort_keys=True) for s in sources}
    if len(cfgs) != 1 or len(preps) != 1 or sources[0]["preprocess"] is None:
        raise BratsError(
            f"{run}: the folds disagree on channels or preprocessing (or a checkpoint lacks it): "
            "cannot export them together"
        )
    modalities = sources[0]["config"]["modalities"]
    contract = PreprocessConfig.from_contract(
        {**sources[0]["preprocess"], "modalities": list(modalities)}, sources[0]["checkpoint"]
    ).to_contract()
    provenance = {
        "classes": list(CLASSES),
        "input": "float32 (B, C, S, S, S), channels in the contract's `modalities` order",
        "outputs": {"probabilities": "(B, 2) [p_LGG, p_HGG]", "logits": "(B, 2)"},
        "ensemble": len(models) > 1,
        "sources": [{k: v for k, v in s.items() if k not in ("preprocess", "config")} for s in sources],
        "architecture": {k: sources[0]["config"][k] for k in ("depth", "layout", "dropout")},
        "cv_summary": {
            "protocol": summary["protocol"],
            "mean_std": {m: summary["mean_std"][m] for m in ("auc", "f1", "accuracy")},
            "pooled": summary["pooled"],
        },
        "run": str(run),
    }

    wrapper = Exported(models).eval()
    out = Path(out) if out else RunPaths(run).model(ensemble=len(models) > 1)
    # Parity inputs: three real preprocessed patients from the run's cache.
    cached = open_data(run_cfg["data"], run_cfg["size"])
    channels = [list(cached.preprocess["modalities"]).index(m) for m in modalities]
    inputs = np.stack([np.asarray(v[channels], dtype=np.float32) for v in cached.volumes[:3]])
    worst = write_onnx(wrapper, inputs, out, {CONTRACT_KEY: contract, PROVENANCE_KEY: provenance}, exporter)
    card = {
        "model": out.name,
        "contract": contract,
        **provenance,
        "parity_max_abs_diff": worst,
        "exporter": exporter,
        "opset": OPSET[exporter],
    }
    card_path = RunPaths.card(out)
    write_json_atomic(card_path, card)
    log.info(f"wrote {out} (parity max |dp| {worst:.1e}) and {card_path}")
    return out
