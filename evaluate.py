"""Re-score every fold's best checkpoint by the explicit policy, verify it, write the CV report.

    python evaluate.py --run runs/cv [--fold 0,1] [--strict] [--trust-checkpoints] [--cam]
    python evaluate.py --run runs/cv --calibrate platt --threshold youden

Policy (RECIPE.md 6.6): best_ema.pt if the run used EMA and it exists, else best.pt, else an error;
never the resume state. Outputs in RUN/evaluation/: summary.json, report.md, predictions.csv,
fold_K/*.png, roc_all_folds.png, reliability.png; with --cam also fold_K/cam_montage.png: the
fold's most confident right and wrong validation patients with the fold model's class activation
map. The calibration and threshold chosen on the pooled out-of-fold predictions go into
summary.json, and export.py puts them in the model; a calibration that makes the cross-fitted
Brier score or log loss worse is not kept unless --force-calibration. A run trained with
--test-fraction has its test set scored too (each fold model and their ensemble, which gets its
own decision there: test_predictions.csv and the report's test-set section).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from brats.errors import BratsError, command_app, exit_on_error, finished, run_cli
from brats.runs.paths import RunPaths

app = command_app(__doc__)


@app.command()
@exit_on_error
def main(
    run: Annotated[Path, typer.Option(help="run folder written by train.py")] = Path("runs/cv"),
    folds: Annotated[
        str | None,
        typer.Option("--fold", "--folds", help="fold(s) to evaluate: 0,1,2 or all [default: all]"),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="a checkpoint whose re-score differs from what it stored is an error [default: off]",
        ),
    ] = False,
    trust_checkpoints: Annotated[
        bool,
        typer.Option(
            "--trust-checkpoints",
            help="allow full unpickling of checkpoints you made (PyTorch >= 2.6) [default: off]",
        ),
    ] = False,
    data: Annotated[str | None, typer.Option(help="cache to score on [default: the run's --data]")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda [default: cuda when available]")] = None,
    calibrate: Annotated[
        str, typer.Option(help="fit p(HGG) on the out-of-fold predictions: none, temperature or platt")
    ] = "none",
    threshold: Annotated[
        str, typer.Option(help="decision threshold: a probability, youden, or sensitivity:0.9")
    ] = "0.5",
    force_calibration: Annotated[
        bool,
        typer.Option(
            "--force-calibration",
            help="keep --calibrate even where it makes the cross-fitted Brier score or log loss worse "
            "[default: off]",
        ),
    ] = False,
    cam: Annotated[
        bool,
        typer.Option(
            "--cam",
            help="also draw each fold's most confident right and wrong patients with the model's CAM "
            "[default: off]",
        ),
    ] = False,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        chosen = folds.strip().lower() if folds else "all"
        wanted = None if chosen == "all" else [int(f) for f in chosen.replace(",", " ").split()]
    except ValueError as e:
        raise BratsError(f"--fold {folds!r}: give fold numbers like 0,1,2, or all") from e
    from brats.evaluation.cross_validation import evaluate_run

    summary = evaluate_run(
        run,
        wanted,
        strict=strict,
        trust=trust_checkpoints,
        data=data,
        device=device,
        calibrate=calibrate,
        threshold=threshold,
        force_calibration=force_calibration,
    )
    paths = RunPaths(run)
    print(paths.report.read_text())
    montages = []
    if cam:
        from brats.evaluation.cam_montage import write_evaluation_montages

        folds_done = [row.fold for row in summary.folds]
        montages = write_evaluation_montages(
            run, folds_done, trust=trust_checkpoints, data=data, device=device
        )
    finished(written(paths, summary, montages), next_step(run, summary))


def written(paths: RunPaths, summary, montages: list[Path]) -> list[tuple[Path, str]]:
    from brats.evaluation.report import RELIABILITY

    files = [
        (paths.report, "the report printed above"),
        (paths.summary, "every figure and the decision, for export.py"),
        (paths.predictions, "each patient's out-of-fold p(HGG)"),
    ]
    if summary.test_set:
        files.append((paths.test_predictions, "the test set's p(HGG), per fold model and the ensemble"))
    files += [
        (paths.roc_all_folds, "ROC of every fold and pooled out of fold"),
        (paths.evaluation / RELIABILITY, "reliability diagram"),
        (
            paths.evaluation / "fold_K",
            f"ROC, precision-recall and confusion matrix of folds {fold_list(summary)}",
        ),
    ]
    return files + [(m, "most confident right and wrong patients with their CAM") for m in montages]


def fold_list(summary) -> str:
    return ",".join(str(row.fold) for row in summary.folds)


def next_step(run: Path, summary) -> str:
    """Export when every fold is evaluated; else the folds left."""
    from brats.runs.reader import run_config
    from brats.training.config import TrainConfig

    k_total = TrainConfig.from_dict(run_config(run)).folds
    left = sorted(set(range(k_total)) - {row.fold for row in summary.folds})
    if left:
        return (
            f"folds {','.join(map(str, left))} are not evaluated: train them (accelerate launch train.py "
            f"--run {run} --fold {','.join(map(str, left))} --data ... --resume), then evaluate again; "
            f"or export what is here: python export.py --run {run}"
        )
    if len(summary.folds) == 1:
        return f"python export.py --run {run}"
    whole = "all folds as one model; without --ensemble, the best fold"
    return f"python export.py --run {run} --ensemble   ({whole})"


if __name__ == "__main__":
    run_cli(app)
