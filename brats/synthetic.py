"""Write a synthetic BraTS 2018-like cohort (brats.data.phantom): real-looking NIfTI files.

python -m brats.synthetic OUT --patients 40 --seed 0 [--shape 240 240 155]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from brats.data.phantom import (
    BRATS18_SHAPE,
    CORRUPTIONS,
    check_corruptions,
    class_counts,
    corrupt_patients,
    make_cohort,
)
from brats.errors import BratsError, command_app, exit_on_error, finished, run_cli
from brats.io.atomic import check_output_dir

app = command_app(__doc__)
SHAPE_MIN, SHAPE_MAX = 8, 1024  # voxels per side: a brain and a tumour need room; BraTS is 240x240x155
_PREFIX = re.compile(r"[A-Za-z0-9_-]+")


def check_options(patients: int, seed: int, shape: tuple[int, int, int], prefix: str, workers: int) -> None:
    """Every option checked before anything is written (one line each, naming the option)."""
    class_counts(patients)
    if seed < 0:
        raise BratsError(f"--seed {seed}: give 0 or a positive integer")
    if not all(SHAPE_MIN <= n <= SHAPE_MAX for n in shape):
        raise BratsError(
            f"--shape {' '.join(map(str, shape))}: each side from {SHAPE_MIN} to {SHAPE_MAX} voxels "
            f"(BraTS: {' '.join(map(str, BRATS18_SHAPE))})"
        )
    if not _PREFIX.fullmatch(prefix):
        raise BratsError(
            f"--prefix {prefix!r}: use letters, digits, _ and - only (it starts every patient id and folder)"
        )
    if workers < 0:
        raise BratsError(f"--workers {workers}: give 0 (all cores) or a number of processes")


@app.command()
@exit_on_error
def main(
    out: Annotated[Path, typer.Argument(help="output folder (BraTS 2018 layout)")],
    patients: Annotated[int, typer.Option(help="number of patients (HGG:LGG = 210:75)")] = 40,
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
    shape: Annotated[tuple[int, int, int], typer.Option(help="volume size X Y Z in voxels")] = BRATS18_SHAPE,
    prefix: Annotated[str, typer.Option(help="patient id prefix")] = "Brats18_SYN",
    workers: Annotated[int, typer.Option(help="parallel processes (0 = all cores)")] = 0,
    sites: Annotated[
        bool,
        typer.Option(
            "--sites",
            help="patients from BraTS 2018-like collections, each grade from its own sites (the site "
            "confound), named in the ids and marked by a scanner signature [default: off]",
        ),
    ] = False,
    corrupt: Annotated[
        list[str] | None,
        typer.Option(
            metavar="<kind>",
            help="corrupt one more patient this way, as a hospital might send it (repeatable; one of "
            + ", ".join(CORRUPTIONS)
            + "): predict should refuse or flag it [default: none]",
        ),
    ] = None,
) -> None:
    check_options(patients, seed, shape, prefix, workers)
    kinds = corrupt or []
    check_corruptions(kinds, patients)
    check_output_dir(out, "output folder")
    made = make_cohort(out, patients, seed, shape, prefix, workers or None, sites)
    n_hgg = sum(label for _, label in made)
    print(f"wrote {len(made)} synthetic patients ({n_hgg} HGG, {len(made) - n_hgg} LGG) to {out}")
    for pid, kind in corrupt_patients(out, kinds, seed):
        print(f"  {pid}: corrupted ({kind})")
    finished([], f"python -m brats.prepare {out} --out {out}_cache   (or train on it: train.py --data {out})")


if __name__ == "__main__":
    run_cli(app)
