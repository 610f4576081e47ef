"""Train the folds of a cross-validation concurrently, one fold per GPU at a time
(brats.training.scheduler).

    python -m brats.cv --gpus 0,1,2,3 --data CACHE --run RUN [--fold 0,1,2,3,4] [-- TRAIN_ARGS]

Arguments after `--` go to train.py unchanged (e.g. -- --k-folds 5 --inner-val 0.15).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from brats.errors import BratsError, command_app, exit_on_error, run_cli
from brats.training.scheduler import ROOT, run_folds


def parse_list(text: str, what: str) -> list[str]:
    items = [t for t in text.replace(",", " ").split() if t]
    if not items:
        raise BratsError(f"--{what} is empty: give e.g. --{what} 0,1")
    return items


app = command_app(__doc__)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@exit_on_error
def main(
    ctx: typer.Context,
    gpus: Annotated[str, typer.Option(help="GPU ids, one fold per GPU at a time (or cpu,cpu)")],
    data: Annotated[str, typer.Option(help="prepared cache or raw BraTS folder")],
    run: Annotated[str, typer.Option(help="run folder")] = "runs/cv",
    folds: Annotated[
        str, typer.Option("--fold", "--folds", help="fold(s) to train: 0,1,2,3,4")
    ] = "0,1,2,3,4",
    size: Annotated[int, typer.Option(help="cube side when DATA must be prepared first")] = 128,
    config_file: Annotated[str, typer.Option(help="accelerate config")] = str(
        ROOT / "accelerate_config.yaml"
    ),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    slots = parse_list(gpus, "gpus")
    try:
        wanted = [int(f) for f in parse_list(folds, "fold")]
    except ValueError as e:
        raise BratsError(f"--fold {folds!r}: give fold numbers like 0,1,2") from e
    from brats.data.cache_reader import ensure_prepared

    data = str(ensure_prepared(data, size))
    failed = run_folds(wanted, slots, data, run, config_file, list(ctx.args))
    if failed:
        raise BratsError(
            f"fold(s) {', '.join(map(str, failed))} failed: see their train.log; rerun to resume them"
        )


if __name__ == "__main__":
    run_cli(app)
