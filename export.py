"""Export the verified best model of a run to ONNX for CPU inference.

    python export.py --run runs/cv                 # the fold with the best re-scored val AUC
    python export.py --run runs/cv --fold 2
    python export.py --run runs/cv --ensemble      # every fold in one graph (mean probabilities)

Works on the folds that are trained (after `train.py --fold 1` alone, `--fold 1` exports it):
the run is evaluated first, on those folds, when RUN/evaluation/summary.json is missing, corrupt
or lacks a fold it needs. --data gives the cache when it has moved since training.

Writes MODEL.onnx and MODEL_card.json (preprocessing contract + provenance); fails, writing
nothing, unless onnxruntime matches torch within 1e-4 at batch 1 and 3.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from brats.deploy.contract import card_path
from brats.errors import BratsError, command_app, exit_on_error, finished, run_cli

app = command_app(__doc__)


@app.command()
@exit_on_error
def main(
    run: Annotated[Path, typer.Option(help="run folder (trained; evaluated first when needed)")] = Path(
        "runs/cv"
    ),
    fold: Annotated[
        int | None, typer.Option(help="export this fold [default: the fold with the best re-scored val AUC]")
    ] = None,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="every trained fold in one graph [default: off]")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="output .onnx [default: RUN/model.onnx, or RUN/model_ensemble.onnx]")
    ] = None,
    exporter: Annotated[str, typer.Option(help="torchscript (fast) or dynamo")] = "torchscript",
    data: Annotated[
        str | None,
        typer.Option(help="cache to evaluate on and take parity inputs from [default: the run's --data]"),
    ] = None,
    trust_checkpoints: Annotated[
        bool,
        typer.Option("--trust-checkpoints", help="allow unpickling your own old checkpoints [default: off]"),
    ] = False,
    allow_unfinished: Annotated[
        bool,
        typer.Option("--allow-unfinished", help="export folds whose training did not finish [default: off]"),
    ] = False,
    doubt: Annotated[
        bool,
        typer.Option(
            "--doubt/--no-doubt",
            help="measure the model's doubt on the cohort (each fold model on each patient) for predict "
            "[default: on]",
            show_default=False,
        ),
    ] = True,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if ensemble and fold is not None:
        raise BratsError("--fold and --ensemble exclude each other")
    from brats.evaluation.export import export

    path = export(
        run,
        out,
        fold=fold,
        ensemble=ensemble,
        trust=trust_checkpoints,
        exporter=exporter,
        data=data,
        allow_unfinished=allow_unfinished,
        doubt=doubt,
    )
    finished(
        [
            (path, "the model (ONNX, CPU or GPU; its contract and provenance in the metadata)"),
            (card_path(path, ".md"), "the model card to read"),
            (card_path(path), "the same, machine-readable"),
        ],
        f"python predict.py {path} PATIENTS --out predictions.csv   (PATIENTS: a BraTS folder, patient "
        "folders or a CSV manifest; --cam maps/ to see where the model looked)",
    )


if __name__ == "__main__":
    run_cli(app)
