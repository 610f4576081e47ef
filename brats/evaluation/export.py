"""Export the verified best model (or every fold as one ensemble) to ONNX for CPU inference.

The checkpoint is chosen with evaluate.py's policy (best EMA first) and loaded into a freshly
built model (never a prepared/compiled module). The graph takes float32 (B, C, S, S, S) with a
dynamic batch axis and returns `probabilities` (B, 2) [p(LGG), p(HGG)], `logits` (B, 2) and
`cam` (B, S, S, S), the class activation map of HGG evidence on the input cube (brats.models.explained);
an ensemble averages the folds' softmax probabilities, logits and maps. The preprocessing
contract and the provenance (which names the outputs) travel in the ONNX metadata and in
model_card.json beside the model, with model_card.md, the card a person reads
(brats.evaluation.model_card). Export fails, leaving nothing behind, unless onnxruntime
matches torch within 1e-4 on the probabilities and on the map (relative to its largest value).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from brats.data.cache_format import INDEX
from brats.data.cache_reader import CachedCohort, channel_indices, open_data
from brats.data.cohort import CLASSES
from brats.data.folds import stored_fold
from brats.data.preprocess import PreprocessConfig
from brats.data.profile import ScanProfile, cohort_profile
from brats.deploy.contract import (
    CAM_OUTPUT,
    DISTANCE_OUTPUT,
    DYNAMIC_AXES,
    FOLDS_OUTPUT,
    OUTPUT_NAMES,
    OUTPUTS,
    Decision,
    card_path,
    check_graph_input,
)
from brats.deploy.inference import CONTRACT_KEY, PROVENANCE_KEY
from brats.deploy.qc import describe_checks
from brats.errors import BratsError
from brats.evaluation.cross_validation import evaluate_run
from brats.evaluation.doubt import fit_doubt
from brats.evaluation.model_card import card_markdown
from brats.io.atomic import (
    atomic_path,
    check_output_file,
    refuse_inputs,
    refuse_other_kind,
    remove_stale_temps,
    write_json_atomic,
    write_text_atomic,
)
from brats.io.names import id_hash
from brats.models.explained import ExplainedModel
from brats.models.resnet import ResNet3D
from brats.runs.identity import recipe_flags
from brats.runs.paths import BEST, BEST_EMA, RunPaths
from brats.runs.reader import (
    check_preprocessing,
    fold_status,
    load_best_model,
    load_summary,
    model_config,
    run_config,
)
from brats.runs.summary import FoldRow, Summary
from brats.training.config import TrainConfig

log = logging.getLogger(__name__)

OPSET = {"torchscript": 17, "dynamo": 18}  # set explicitly per exporter
EXPORTERS = tuple(OPSET)
PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch|
# max |cam_onnx - cam_torch| / max(1, max |cam_torch|): the map is in logit units per voxel, whose
# scale depends on the model, so it is compared relative to its largest value.
CAM_PARITY_TOLERANCE = 1e-4


def load_fold(run: Path, k: int, run_cfg: dict, trust: bool) -> tuple[ResNet3D, dict]:
    """Fold k's model by evaluate.py's policy, and where it came from."""
    model, ckpt, path = load_best_model(run, k, run_cfg, trust)
    info = {
        "fold": k,
        "checkpoint": str(path),
        "is_ema": ckpt.is_ema,
        "epoch": ckpt.epoch,
        "stored_val_auc": ckpt.val_auc,
        "preprocess": ckpt.preprocess,
        "config": model_config(ckpt, run_cfg),
    }
    return model, info


def output_names(model: ExplainedModel) -> list[str]:
    """The graph's outputs, in order: the model's doubt only when it has feature references."""
    return list(OUTPUT_NAMES if model.references is not None else OUTPUT_NAMES[:3])


def check_parity(path: Path, model: ExplainedModel, inputs: np.ndarray) -> dict[str, float]:
    """onnxruntime (CPU) against torch on `inputs` at batch 1 and 3, per output: max |onnx -
    torch|, relative to max(1, the largest |torch| value) for the CAM and the feature distance
    (their scale depends on the model)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = output_names(model)
    worst = dict.fromkeys(n for n in names if n != "logits")
    worst = {n: 0.0 for n in worst}
    for batch in (1, 3):
        x = np.ascontiguousarray(inputs[:batch])
        with torch.no_grad():
            expected = dict(zip(names, (t.numpy() for t in model(torch.from_numpy(x)))))
        got = dict(zip(names, session.run(names, {"input": x})))
        for name in worst:
            if got[name].shape != expected[name].shape:
                raise BratsError(
                    f"ONNX output {name} has shape {got[name].shape} at batch {batch}, "
                    f"torch {expected[name].shape}"
                )
            relative = name in (CAM_OUTPUT, DISTANCE_OUTPUT)
            scale = max(1.0, float(np.abs(expected[name]).max())) if relative else 1.0
            worst[name] = max(worst[name], float(np.abs(got[name] - expected[name]).max()) / scale)
    return worst


def write_onnx(
    wrapper: ExplainedModel,
    inputs: np.ndarray,
    out: Path,
    metadata: dict[str, dict],
    exporter: str = "torchscript",
    card: dict | None = None,
) -> dict[str, float]:
    """Export `wrapper` to `out` atomically: dynamic batch, metadata as JSON strings, full
    checker, the graph's input checked against the contract in `metadata`, and parity against
    torch on `inputs` (>= 3 samples) for the probabilities and the CAM; returns the parity
    (`check_parity`). `card` (with the parity added) is written beside the model just before the
    model itself, so a failure leaves neither.

    `torchscript` (default) exports faster (bench/RESULTS.md, "Figures the code relies on");
    `dynamo` is the exporter PyTorch develops further. Both are traced with a batch of 2 and a
    dynamic batch axis, since the dynamo exporter would fix a batch of 1 traced with 1.
    """
    if exporter not in EXPORTERS:
        raise BratsError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        how = {"dynamo": True, "dynamic_shapes": {"x": {0: batch}}, "external_data": False}
    else:
        names = output_names(wrapper)
        how = {
            "dynamo": False,
            "dynamic_axes": {k: v for k, v in DYNAMIC_AXES.items() if k in ("input", *names)},
        }
    with atomic_path(out) as tmp:
        torch.onnx.export(
            wrapper,
            (torch.from_numpy(inputs[:2]),),
            str(tmp),
            opset_version=OPSET[exporter],
            input_names=["input"],
            output_names=output_names(wrapper),
            **how,
        )
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        proto.producer_name = "brats"
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        if CONTRACT_KEY in metadata:
            dims = proto.graph.input[0].type.tensor_type.shape.dim
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            check_graph_input(
                shape,
                PreprocessConfig.from_contract(metadata[CONTRACT_KEY], out),
                out,
                "nothing written (export from a cache preprocessed as the checkpoint was, with --data)",
            )
        parity = check_parity(tmp, wrapper, inputs)
        if not parity["probabilities"] <= PARITY_TOLERANCE:
            raise BratsError(
                f"ONNX parity failed: max |p_onnx - p_torch| = {parity['probabilities']:.2e} > "
                f"{PARITY_TOLERANCE:g}; nothing written"
            )
        if not parity["cam"] <= CAM_PARITY_TOLERANCE:
            raise BratsError(
                f"ONNX parity failed on the CAM: max |cam_onnx - cam_torch| = {parity['cam']:.2e} of "
                f"its largest value > {CAM_PARITY_TOLERANCE:g}; nothing written"
            )
        doubt = {n: parity[n] for n in (FOLDS_OUTPUT, DISTANCE_OUTPUT) if n in parity}
        if not all(v <= PARITY_TOLERANCE for v in doubt.values()):
            raise BratsError(f"ONNX parity failed on the model's doubt ({doubt}); nothing written")
        if card is not None:
            card = {
                **card,
                "parity_max_abs_diff": parity["probabilities"],
                "cam_parity_max_rel_diff": parity["cam"],
                "doubt_parity_max_diff": doubt,
            }
            readable = card_markdown(card)  # before either is written: a failure leaves neither
            write_json_atomic(RunPaths.card(out), card)
            write_text_atomic(card_path(out, ".md"), readable)
    return parity


def check_model_outputs(out: Path, run: Path, cache: Path) -> None:
    """Before any work: the model and its card can be written (the folder is created if missing)
    without replacing a run's or a cache's file, or any file that is not a model (card) this
    command wrote; temp files of a killed export there are removed."""
    card, readable = RunPaths.card(out), card_path(out, ".md")
    if out.is_dir():
        raise BratsError(
            f"{out} is a folder: give the model a file name with --out, e.g. {out / 'model.onnx'}"
        )
    for path in (card, readable):
        if path.is_dir():
            raise BratsError(f"{path} is a folder, where export writes the model card: move it away")
    if out.suffix != ".onnx":
        raise BratsError(
            f"--out {out}: an exported model's file name ends in .onnx, e.g. {out.with_suffix('.onnx')}"
        )
    protected = run_files(run) | {cache: "the cache", cache / INDEX: "the cache's index"}
    refuse_inputs(out, protected, "--out")
    refuse_inputs(card, protected, "the model card of --out")
    refuse_inputs(readable, protected, "the Markdown model card of --out")
    refuse_other_kind(
        out, lambda head: head[:1] == b"\x08", "an ONNX model", "--out"
    )  # ModelProto.ir_version
    refuse_other_kind(
        card, lambda head: head.lstrip().startswith(b'{\n  "model"'), "a model card", "--out's card"
    )
    refuse_other_kind(
        readable, lambda head: head.startswith(b"# Model card: "), "a model card", "--out's Markdown card"
    )
    check_output_file(out, "the model (--out)")
    for stale in remove_stale_temps(out.parent):
        log.info(f"removed {stale.name}, left by an export or write that was killed")


def run_files(run: Path) -> dict[Path, str]:
    """Every file a run holds that an output must never replace."""
    paths = RunPaths(run)
    files = {paths.config: "the run's config", paths.splits: "the run's splits", paths.summary: "its summary"}
    for k in paths.folds():
        for f in (paths.best(k), paths.best(k, ema=True), paths.state(k), paths.metrics(k), paths.log(k)):
            files[f] = f"fold {k}'s {f.name}"
    return {**files, paths.report: "its report", paths.predictions: "its out-of-fold predictions"}


def evaluated_folds(
    run: Path, needed: list[int], trained: list[int], trust: bool, data: str | None
) -> Summary:
    """The summary of the run's evaluation, evaluating the trained folds first when it is
    missing, unreadable or lacks a fold in `needed` (then with the options it was evaluated with)."""
    path = RunPaths(run).summary
    if not path.is_file():
        log.info(f"{path} missing: evaluating folds {trained} first")
        return evaluate_run(run, trained, trust=trust, data=data)
    try:
        summary = load_summary(run)
    except BratsError as e:  # corrupt: evaluating writes it again
        log.warning(f"{e}; evaluating folds {trained} instead")
        return evaluate_run(run, trained, trust=trust, data=data)
    missing = sorted(set(needed) - {row.fold for row in summary.folds})
    if missing:  # evaluated again as it was: the same kind of decision, not the defaults
        options = summary.decision_options()
        log.info(
            f"{path} lacks fold(s) {missing}: evaluating folds {trained} first (--calibrate "
            f"{options['calibrate']} --threshold {options['threshold']}, as it was evaluated)"
        )
        return evaluate_run(run, trained, trust=trust, data=data, **options)
    return summary


def export(
    run: str | Path,
    out: str | Path | None = None,
    fold: int | None = None,
    ensemble: bool = False,
    trust: bool = False,
    exporter: str = "torchscript",
    data: str | Path | None = None,
    allow_unfinished: bool = False,
    doubt: bool = True,
) -> Path:
    """Write the ONNX model and model_card.json; returns the model path.

    Works on the folds that are trained: the run is evaluated first (those folds only) when its
    summary is missing, corrupt or lacks a fold that is needed. `data` replaces the run's cache
    (e.g. one that was moved), as evaluate.py --data does.
    """
    run = Path(run)
    run_cfg = run_config(run)
    if exporter not in EXPORTERS:
        raise BratsError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if ensemble and fold is not None:
        raise BratsError("--fold and --ensemble exclude each other")
    trained = RunPaths(run).trained(TrainConfig.from_dict(run_cfg).folds)
    if not trained:
        raise BratsError(
            f"{run}: no trained fold (no fold_K/{BEST} or {BEST_EMA}): train one with "
            f"accelerate launch train.py --run {run} --fold K"
        )
    if fold is not None and fold not in trained:
        raise BratsError(
            f"--fold {fold}: {RunPaths(run).fold(fold)} holds no {BEST} or {BEST_EMA}; "
            f"trained folds: {', '.join(map(str, trained))}"
        )
    out = Path(out) if out else RunPaths(run).model(ensemble=ensemble and len(trained) > 1)
    check_model_outputs(out, run, Path(data or run_cfg["data"]))
    data = str(data) if data is not None else None

    summary = evaluated_folds(run, [fold] if fold is not None else trained, trained, trust, data)
    evaluated = {row.fold: row for row in summary.folds if row.fold in trained}
    if ensemble:
        folds = sorted(evaluated)
    elif fold is not None:
        folds = [fold]
    else:  # the fold whose re-scored validation AUC is best
        folds = [max(evaluated.values(), key=lambda r: (r.rescored_val_auc, -r.fold)).fold]

    check_finished(run, folds, allow_unfinished)
    models, sources = load_sources(run, folds, run_cfg, trust, evaluated)
    # Parity inputs: three real preprocessed patients from the cache, which must be preprocessed
    # as the checkpoints were (the graph is traced at its size).
    cached = open_data(data or run_cfg["data"], run_cfg["size"])
    for s in sources:
        check_preprocessing(cached, s["preprocess"], Path(s["checkpoint"]))
    modalities = sources[0]["config"]["modalities"]
    contract = make_contract(run, sources, summary, cached)
    references = None
    if doubt:
        references, contract["doubt"] = fit_doubt(models, folds, run, cached, list(modalities))
    provenance = make_provenance(run, sources, summary, run_cfg)
    provenance["quality_control"] = describe_checks(contract.get("profile"), contract.get("doubt"))
    provenance["performance"] = performance(summary, folds, contract.get("doubt"))
    wrapper = ExplainedModel(models, references).eval()
    channels = channel_indices(cached, modalities)
    inputs = np.stack([np.asarray(v[channels], dtype=np.float32) for v in cached.volumes[:3]])
    card = {
        "model": out.name,
        "contract": contract,
        **provenance,
        "exporter": exporter,
        "opset": OPSET[exporter],
    }
    parity = write_onnx(
        wrapper, inputs, out, {CONTRACT_KEY: contract, PROVENANCE_KEY: provenance}, exporter, card=card
    )
    log.info(
        f"wrote {out} (parity max |dp| {parity['probabilities']:.1e}, CAM {parity['cam']:.1e} of its "
        f"largest value), {RunPaths.card(out)} and {card_path(out, '.md')}"
    )
    return out


def make_contract(run: Path, sources: list[dict], summary: Summary, cached: CachedCohort) -> dict:
    """What the exported model promises: the preprocessing, the decision (calibration and
    threshold chosen on the out-of-fold predictions), and the training cohort's scan profile
    (what predict's quality control compares new patients with)."""
    modalities = list(sources[0]["config"]["modalities"])
    contract = PreprocessConfig.from_contract(
        {**sources[0]["preprocess"], "modalities": modalities}, sources[0]["checkpoint"]
    ).to_contract()
    decision, _ = shipped_decision(summary, [s["fold"] for s in sources])
    contract["decision"] = Decision.from_dict(
        decision, RunPaths(run).summary, f"rerun python evaluate.py --run {run}"
    ).to_dict()
    profiles = [ScanProfile.from_json(p) for p in cached.profiles if p]
    if profiles:
        contract["profile"] = cohort_profile(profiles)
    else:
        log.warning(f"{cached.root}: prepared before scan profiles were kept: rerun brats.prepare for QC")
    return contract


def shipped_decision(summary: Summary, folds: list[int]) -> tuple[dict, str]:
    """The decision an export of `folds` ships, and what it was fitted on. An ensemble gets its
    own decision, fitted on its test-set predictions, when the run has a test set and it
    averages the folds scored there (brats.evaluation.test_set); otherwise every export gets the
    decision fitted on the single fold models' pooled out-of-fold predictions."""
    test = summary.test_set
    if len(folds) > 1 and test and summary.ensemble_decision and test["ensemble"]["folds"] == sorted(folds):
        return summary.ensemble_decision, "ensemble_test_set"
    return summary.decision, "single_fold_out_of_fold"


def performance(summary: Summary, folds: list[int], doubt: dict | None) -> dict:
    """What the exported model can be expected to do, and what that rests on (model card and
    ONNX metadata; predict prints `expected`)."""
    pooled, test = summary.pooled, summary.test_set
    oof = "no pooled out-of-fold AUC"
    if "auc" in pooled:
        lo, hi = pooled["auc_ci95"]
        oof = f"pooled out-of-fold AUC {pooled['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})"
    out: dict = {"decision_fitted_on": shipped_decision(summary, folds)[1], "expected": oof}
    if len(folds) == 1:
        return {**out, **single_fold_performance(summary, folds[0], oof)}
    if out["decision_fitted_on"] == "ensemble_test_set":
        ens = test["ensemble"]
        own = ens["own_decision"]
        probabilities = own["calibrated" if "calibrated" in own else "raw"]
        out["expected"] = (
            f"test-set AUC {ens['single_fold_decision']['auc']:.3f} on {test['n']} held-out patients"
        )
        out["test_set"] = {
            "n": test["n"],
            "auc": ens["single_fold_decision"]["auc"],
            "auc_ci95": ens["single_fold_decision"]["auc_ci95"],
            "operating_point": own["operating_point"],
            "how": own["how"],
            **{k: v for k, v in probabilities.items() if k != "reliability"},
        }
        return out
    out["expected"] = f"unmeasured for the ensemble; its folds' {oof}"
    out["transfer"] = (
        "the decision (calibration and threshold) was fitted on the single fold models' out-of-fold "
        "predictions; the ensemble averages them, and how well the decision transfers to it is "
        "unmeasured: train with --test-fraction to measure it and to fit the ensemble its own"
    )
    if doubt and "fold_logit_sd" in doubt:
        out["fold_logit_sd"] = doubt["fold_logit_sd"]
    return out


def single_fold_performance(summary: Summary, k: int, oof: str) -> dict:
    """A single-fold export: its validation AUC is said for what it is, the largest of K."""
    row, n = summary.fold(k), len(summary.folds)
    out = {
        "expected": oof,
        "selection": (
            f"fold {k} has the best re-scored validation AUC of the {n} folds ({row.rescored_val_auc:.3f}): "
            f"the largest of {n} noisy figures, each on its own fold's patients, which overstates this "
            "model; it is not its expected performance"
            if n > 1
            else f"the only fold evaluated (validation AUC {row.rescored_val_auc:.3f})"
        ),
    }
    test = summary.test_set
    if test and str(k) in test["folds"]:
        figures = test["folds"][str(k)]
        out["test_set"] = {"n": test["n"], **figures}
        out["expected"] = f"test-set AUC {figures['auc']:.3f} on {test['n']} held-out patients; {oof}"
    return out


def check_finished(run: Path, folds: list[int], allowed: bool) -> None:
    """A fold whose training was killed (or still runs) is not exported unless `allowed`."""
    stopped = {k: s["epochs"] for k in folds if (s := fold_status(run, k)) is not None and not s["finished"]}
    if stopped and not allowed:
        said = ", ".join(f"fold {k} after epoch {n}" for k, n in stopped.items())
        raise BratsError(
            f"{run}: {said} did not finish training: resume with train.py --resume (or make cv), or "
            "export as it is with --allow-unfinished"
        )
    for k, n in stopped.items():
        log.warning(f"fold {k} did not finish training (stopped after epoch {n}): exported as it is")


def load_sources(
    run: Path, folds: list[int], run_cfg: dict, trust: bool, evaluated: dict[int, FoldRow]
) -> tuple[list[ResNet3D], list[dict]]:
    """The folds' models by the policy and where each came from; they must agree on channels
    and preprocessing to be exported together."""
    models, sources = [], []
    for k in folds:
        model, info = load_fold(run, k, run_cfg, trust)
        info["rescored_val_auc"] = evaluated[k].rescored_val_auc
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
    return models, sources


def make_provenance(run: Path, sources: list[dict], summary: Summary, run_cfg: dict) -> dict:
    """What the exported model is and where it came from (ONNX metadata and model card)."""
    return {
        "training": training_recipe(run_cfg, summary),
        "classes": list(CLASSES),
        "input": "float32 (B, C, S, S, S), channels in the contract's `modalities` order",
        "outputs": OUTPUTS,
        "ensemble": len(sources) > 1,
        "sources": [{k: v for k, v in s.items() if k not in ("preprocess", "config")} for s in sources],
        "architecture": {k: sources[0]["config"][k] for k in ("depth", "layout", "dropout")},
        "cv_summary": {
            "protocol": summary.protocol,
            "optimistic": summary.optimistic,
            "mean_std": {m: summary.mean_std[m] for m in ("auc", "macro_f1", "f1", "accuracy")},
            "pooled": summary.pooled,
            "calibration": summary.calibration,  # Brier, ECE, operating point (raw/calibrated)
        },
        "run": str(run),
        "warnings": summary.warnings,  # results that may mean nothing (evaluate.py's report says why)
        "confound": summary.confound,
        # who the exported models trained on, as hashed ids (brats.io.names.id_hash): predict
        # says when it grades one of them, whose grade is then no new patient's
        "trained_on": sorted({id_hash(p) for s in sources for p in training_patients(run, s["fold"])}),
    }


def training_recipe(run_cfg: dict, summary: Summary) -> dict:
    """How the run was trained and evaluated, as the options that redo it (the model card's "How
    to reproduce")."""
    cfg = TrainConfig.from_dict(run_cfg)
    options = summary.decision_options()
    evaluate = ["--calibrate", options["calibrate"], "--threshold", options["threshold"]]
    return {
        "data": cfg.data,
        "policy": cfg.policy,
        "k": cfg.folds,
        "split_seed": cfg.split_seed,
        "group_by": cfg.group_by,
        "flags": recipe_flags(run_cfg),
        "evaluate_flags": evaluate + (["--force-calibration"] if options["force_calibration"] else []),
    }


def training_patients(run: Path, k: int) -> list[str]:
    """Fold k's patients that updated its weights or chose its epoch (splits.json)."""
    fold = stored_fold(RunPaths(run).splits, k)
    return [*fold.train, *fold.val] if fold is not None else []
