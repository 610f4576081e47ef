"""The model card a person reads: export.py writes it as Markdown beside the JSON card (the same
facts, machine-readable) and the ONNX model.

Every figure comes from the JSON card, which export builds from the run's evaluation
(summary.json) and the model's contract; nothing here is measured again.

No torch here.
"""

from __future__ import annotations

import shlex

from brats.deploy.contract import card_path
from brats.deploy.report import MODALITY_NAMES, rule_in_words

SMALL_COHORT = 100  # below this many patients, say how wide the intervals are


def _ci(figure: float, ci: list[float] | tuple[float, float] | None, digits: int = 3) -> str:
    if ci is None:
        return f"{figure:.{digits}f}"
    return f"{figure:.{digits}f} (95% CI {ci[0]:.{digits}f} to {ci[1]:.{digits}f})"


def _command(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def intended_use(card: dict) -> list[str]:
    mods = ", ".join(MODALITY_NAMES.get(m, m) for m in card["contract"]["modalities"])
    return [
        "## Intended use",
        "",
        f"Research on glioma grading: the model calls a glioma HGG or LGG from {mods} MRI. It is not a "
        "medical device and its output is not a diagnosis.",
        "",
        "- Inputs must be in BraTS space: the sequences co-registered to one grid, resampled to 1 mm, "
        "skull-stripped with background 0 (as the BraTS challenge distributes them). Scans as acquired "
        "(skull on, thick slices, each sequence on its own grid) must first go through that "
        "preprocessing; `predict.py` refuses those it can tell apart (see *Input checks*).",
        "- The grades are the BraTS labels (HGG: WHO grade IV; LGG: grades II-III), not the molecular "
        "classes of the WHO 2021 classification.",
        "- One glioma per patient, as in the training cohort; other tumours are outside its scope.",
    ]


def model_section(card: dict) -> list[str]:
    c, arch = card["contract"], card["architecture"]
    sources = card["sources"]
    who = (
        f"An ensemble of {len(sources)} fold models: their probabilities are averaged"
        if card["ensemble"]
        else "One fold model"
    )
    lines = [
        "## Model",
        "",
        f"- 3D ResNet-{arch['depth']} ({arch['layout']} layout, dropout {arch['dropout']}), input "
        f"{len(c['modalities'])} x {c['size']}^3 ({', '.join(c['modalities'])}; {c['orientation']}, "
        f"{c['normalization']} intensities).",
        f"- {who}:",
    ]
    for s in sources:
        kind = "EMA weights" if s.get("is_ema") else "weights"
        lines.append(
            f"  - fold {s['fold']}: {kind} of epoch {s['epoch']}, re-scored validation AUC "
            f"{s['rescored_val_auc']:.3f}"
        )
    outputs = ", ".join(f"`{name}`" for name in card["outputs"])
    lines.append(f"- Outputs: {outputs} (described in `{card_path(card['model']).name}`).")
    lines.append(
        f"- ONNX ({card['exporter']} exporter, opset {card['opset']}); onnxruntime matches PyTorch within "
        f"{card['parity_max_abs_diff']:.1e} on p(HGG)."
    )
    return lines


def training_data(card: dict) -> list[str]:
    pooled, perf = card["cv_summary"]["pooled"], card.get("performance") or {}
    training = card.get("training") or {}
    lines = ["## Training data", ""]
    if pooled.get("n"):
        lines.append(
            f"- Cross-validation over {pooled['n']} patients ({pooled.get('hgg', '?')} HGG, "
            f"{pooled.get('lgg', '?')} LGG), {training.get('k', len(card['sources']))} folds stratified by "
            f"grade (split seed {training.get('split_seed', '?')})."
        )
    test = perf.get("test_set")
    if test:
        lines.append(f"- {test['n']} further patients held out of every fold: the test set.")
    if training.get("group_by"):
        lines.append(
            f"- Folds grouped by {training['group_by']}: no validation fold shares one with training."
        )
    if training.get("data"):
        lines.append(f"- Data: `{training['data']}` (run `{card['run']}`).")
    profile = card["contract"].get("profile")
    if profile:
        f = profile["features"]
        lines.append(
            f"- Scans: voxel spacing up to {f['spacing_max_mm']['max']:g} mm; brain volume "
            f"{f['brain_ml']['min']:.0f}-{f['brain_ml']['max']:.0f} ml; orientation "
            f"{', '.join(profile['orientations'])}."
        )
    return lines


def evaluation(card: dict) -> list[str]:
    cv, perf = card["cv_summary"], card.get("performance") or {}
    pooled = cv["pooled"]
    lines = ["## Evaluation", "", f"Protocol: {cv['protocol']}."]
    if cv.get("optimistic"):
        lines.append(
            "The out-of-fold figures are optimistic: each fold chose its epoch on the patients it was "
            "scored on."
        )
    lines += ["", "| figure | value |", "|---|---|"]
    if "auc" in pooled:
        lines.append(
            f"| pooled out-of-fold AUC ({pooled['n']} patients) | {_ci(pooled['auc'], pooled['auc_ci95'])} |"
        )
    for metric, name in (("auc", "AUC"), ("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        ms = cv["mean_std"][metric]
        lines.append(f"| fold {name}, mean +- SD | {ms['mean']:.3f} +- {ms['std']:.3f} |")
    test = perf.get("test_set")
    if test and "auc" in test:
        who = "the ensemble" if card["ensemble"] else "this model"
        lines.append(f"| test-set AUC, {who} ({test['n']} patients) | {_ci(test['auc'], test['auc_ci95'])} |")
    raw = (cv.get("calibration") or {}).get("raw") or {}
    if "brier" in raw:
        lines.append(f"| Brier score, out of fold | {raw['brier']:.3f} |")
    if "slope" in raw:  # undefined when the scored patients are of one grade
        lines.append(f"| calibration slope, out of fold | {_ci(raw['slope'], raw.get('slope_ci95'), 2)} |")
    lines += ["", f"Expected on new BraTS-space patients: {perf.get('expected', 'not recorded')}."]
    if perf.get("selection"):
        lines.append(f"Note: {perf['selection']}.")
    for warning in card.get("warnings") or []:
        lines.append(f"Warning: {warning}")
    return lines


def decision(card: dict) -> list[str]:
    d, perf = card["contract"]["decision"], card.get("performance") or {}
    own = perf.get("decision_fitted_on") == "ensemble_test_set"
    where = (
        "the held-out test set (the ensemble's own predictions)"
        if own
        else "the pooled out-of-fold predictions"
    )
    prob = "p(HGG)" if d["calibration"] == "none" else f"p(HGG) after {d['calibration']} scaling"
    lines = [
        "## Decision",
        "",
        f"HGG when {prob} >= {d['threshold']:.4g}: {rule_in_words(d['rule'])}, fitted on {where}.",
    ]
    point = (perf.get("test_set") or {}).get("operating_point") if own else None
    point = point or (card["cv_summary"].get("calibration") or {}).get("operating_point")
    if point:
        how = (perf.get("test_set") or {}).get("how") if own else card["cv_summary"]["calibration"].get("how")
        lines.append(
            f"At this decision: accuracy {point['accuracy']:.2f}, sensitivity {point['sensitivity']:.2f}, "
            f"specificity {point['specificity']:.2f} ({how})."
        )
    dropped = (card["cv_summary"].get("calibration") or {}).get("not_shipped")
    if dropped and not own:
        why = dropped.get("reason") or "it did not improve the cross-fitted Brier score and log loss"
        lines.append(f"{dropped['method'].capitalize()} calibration was tried and not kept: {why}.")
    return lines


def input_checks(card: dict) -> list[str]:
    qc = card.get("quality_control") or {}
    lines = ["## Input checks at prediction", ""]
    for name, text in (qc.get("hard") or {}).items():
        lines.append(f"- {name.replace('_', ' ').capitalize()}: {text}.")
    if qc.get("soft"):
        lines.append(f"- Unusual scans: {qc['soft']}.")
    for name, text in (qc.get("doubt") or {}).items():
        lines.append(f"- {name.replace('_', ' ').capitalize()}: graded, but flagged: {text}.")
    if len(lines) == 2:
        lines.append("- None recorded: this model was exported without a scan profile.")
    return lines


def limitations(card: dict) -> list[str]:
    cv, perf = card["cv_summary"], card.get("performance") or {}
    lines = ["## Known limitations", ""]
    confound = card.get("confound")
    if confound and "site_only_auc" in confound:
        verdict = "flagged: " if confound["flagged"] else ""
        lines.append(
            f"- Site confound ({verdict}the data collection alone grades the cohort with AUC "
            f"{confound['site_only_auc']:.2f}; {confound['one_grade_share']:.0%} of the patients come from a "
            "collection holding one grade). The model may have learnt the site along with the grade; "
            "`train.py --group-by collection` measures it on unseen sites."
        )
    else:
        lines.append(
            "- Site confound: not measured (the patients' collections are unknown or there is one). In "
            "BraTS 2018 each collection holds mostly one grade, so a model can grade by site."
        )
    if perf.get("transfer"):
        lines.append(f"- Calibration transfer: {perf['transfer']}.")
    lines.append(
        "- Another hospital's scanners and protocols shift the probabilities: the calibration and the "
        "threshold were fitted on this cohort and may not hold there. Check them on local patients with "
        "known grades before relying on a grade."
    )
    n = cv["pooled"].get("n", 0)
    if n and n < SMALL_COHORT:
        lines.append(f"- {n} patients: every interval above is wide, and a few patients move each figure.")
    lines.append(
        "- Inputs outside BraTS space are graded without meaning unless the input checks catch them; "
        "they compare each scan with the training scans' ranges, which cannot catch every difference "
        "(a scan flipped left to right passes, for one)."
    )
    return lines


def reproduce(card: dict) -> list[str]:
    training = card.get("training")
    if not training:
        return []
    run = f"{card['run']}_again"  # a new folder: the run's own would skip its finished folds
    train = ["accelerate", "launch", "train.py", "--data", training["data"], "--run", run, "--fold", "all"]
    train += ["--policy", training["policy"], *training["flags"]]
    export = ["python", "export.py", "--run", run, *(["--ensemble"] if card["ensemble"] else [])]
    if not card["ensemble"]:
        export += ["--fold", str(card["sources"][0]["fold"])]
    if card["exporter"] != "torchscript":
        export += ["--exporter", card["exporter"]]
    if "doubt" not in card["contract"]:
        export += ["--no-doubt"]
    return [
        "## How to reproduce",
        "",
        "```",
        _command(train),
        _command(["python", "evaluate.py", "--run", run, *training["evaluate_flags"]]),
        _command(export),
        "```",
        "",
        "On the CPU the same seed gives the same splits and the same figures; on a GPU, the same splits "
        "and figures within floating-point noise. Launch with as many processes as the run had: the "
        "effective batch is batch x accumulation x processes.",
    ]


def card_markdown(card: dict) -> str:
    """The Markdown model card for a JSON model card's contents."""
    title = [
        f"# Model card: {card['model']}",
        "",
        f"Written by export.py beside the model; `{card_path(card['model']).name}` holds the same facts "
        "and more, machine-readable.",
    ]
    sections = [
        title,
        intended_use(card),
        model_section(card),
        training_data(card),
        evaluation(card),
        decision(card),
        input_checks(card),
        limitations(card),
        reproduce(card),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
