"""Before/after table of two evaluated runs on the same folds (brats.evaluation.ablation).

python -m brats.ablation RUN_BEFORE RUN_AFTER [--out ablation.md]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brats.errors import command_app, exit_on_error, run_cli
from brats.evaluation.ablation import ablation_markdown
from brats.io.atomic import check_output_file, write_text_atomic

app = command_app(__doc__)


@app.command()
@exit_on_error
def main(
    before: Annotated[Path, typer.Argument(help="run of the baseline policy")],
    after: Annotated[Path, typer.Argument(help="run of the final policy")],
    out: Annotated[
        Path | None, typer.Option(help="markdown file to write [default: none, the table is printed]")
    ] = None,
) -> None:
    if out:
        check_output_file(out, "--out")
    text = ablation_markdown(before, after)
    if out:
        write_text_atomic(out, text)
    print(text)


if __name__ == "__main__":
    run_cli(app)
