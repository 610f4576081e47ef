"""Preprocess a cohort into a cache once, in parallel.

    python -m brats.prepare ROOT --out CACHE [--size 128] [--workers N] [--skip-bad]

ROOT: BraTS 2018/2019 folder, BraTS 2020 folder with name_mapping.csv, or a CSV manifest.
Exit status 1 when any patient failed (all are listed with their reasons); with --skip-bad the
cache is still indexed without them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from brats.data.cache_builder import check_cache_dir, check_size, prepare
from brats.data.cohort import check_trainable, find_cases, summarize
from brats.data.preprocess import PreprocessConfig
from brats.errors import BratsError, command_app, exit_on_error, finished, run_cli
from brats.io.atomic import refuse_inputs

app = command_app(__doc__)


@app.command()
@exit_on_error
def main(
    root: Annotated[Path, typer.Argument(readable=False, help="cohort: BraTS folder or CSV manifest")],
    out: Annotated[Path, typer.Option(help="cache folder to create or update")],
    size: Annotated[int, typer.Option(help="output cube side S in voxels (RECIPE.md 6.2: 128)")] = 128,
    workers: Annotated[int, typer.Option(help="parallel processes (0 = all cores)")] = 0,
    skip_bad: Annotated[
        bool,
        typer.Option(
            help="index the cache without the patients that failed [default: off]", show_default=False
        ),
    ] = False,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace", help="prepare again a cache made with other settings (e.g. --size) [default: off]"
        ),
    ] = False,
    progress: Annotated[
        bool, typer.Option(help="show a progress bar [default: on]", show_default=False)
    ] = True,
) -> None:
    check_size(size)
    if workers < 0:
        raise BratsError(f"--workers {workers}: give 0 (all cores) or a number of processes")
    cohort = find_cases(root)  # lists files only: cheap, and a wrong ROOT creates no --out folder
    print(f"{root}: {summarize([c.label for c in cohort.cases])}")
    check_trainable(cohort.cases, root, cohort.problems)
    protected = {
        root: "the cohort",
        **{c.path("t1").parent: f"{c.patient_id}'s folder" for c in cohort.cases},
    }
    refuse_inputs(out, protected, "--out")
    check_cache_dir(out)  # before any preprocessing
    result = prepare(
        cohort.cases,
        out,
        PreprocessConfig(size=size),
        workers or None,
        skip_bad=skip_bad,
        replace=replace,
        known_failures=cohort.problems,
        source=str(root),
        progress=progress,
    )
    if result.index_problem:
        print(f"{result.index_problem}: rebuilt")
    for line in result.repaired:
        print(line)
    print(
        f"{out}: {len(result.written)} preprocessed, {len(result.reused)} unchanged, "
        f"{len(result.failed)} failed; index {'written' if result.index_written else 'unchanged'}"
    )
    if result.failed:
        print(f"{len(result.failed)} patient(s) failed:", file=sys.stderr)
        for line in result.failed:
            print(f"  {line}", file=sys.stderr)
        if not skip_bad:
            print("fix them and rerun (only they are redone), or pass --skip-bad", file=sys.stderr)
        raise SystemExit(1)
    finished(
        [(out, "the cache: one .npy per patient, index.json, preprocess.json")],
        f"accelerate launch train.py --data {out} --run runs/cv --fold all --resume   "
        f"(or make cv DATA={out})",
    )


if __name__ == "__main__":
    run_cli(app)
