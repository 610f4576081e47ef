"""The README's real-data recipe names options the scripts accept, and its figures match the code."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from brats.training.config import make_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def recipe() -> str:
    section = README.split("## On real data", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")


def options_of(script: str) -> set[str]:
    r = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, env={"COLUMNS": "200"}
    )
    assert r.returncode == 0, r.stderr
    return set(re.findall(r"--[a-z][a-z0-9-]*", r.stdout))


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "export.py", "predict.py"])
def test_recipe_options_exist(script):
    lines = [line for line in recipe().splitlines() if not line.lstrip().startswith("#")]
    used = set()
    for line in lines:
        if script == "train.py" and "make cv" in line:
            used |= set(re.findall(r"--[a-z][a-z0-9-]*", line.split("TRAIN_ARGS=", 1)[1]))
        elif f" {script}" in line:
            used |= set(re.findall(r"--[a-z][a-z0-9-]*", line.split(script, 1)[1]))
    used.discard("--config_file")
    assert used, f"the recipe does not run {script}"
    assert used <= options_of(script), used - options_of(script)


def test_recipe_reports_numbers_from_an_inner_validation_protocol():
    train_lines = [line for line in recipe().splitlines() if "train.py" in line or "make cv" in line]
    assert train_lines and all("--inner-val" in line for line in train_lines if not line.startswith("#"))


def test_learning_rate_table_matches_the_policies():
    final, baseline = make_config(data="x"), make_config("baseline", data="x")
    row = next(line for line in README.splitlines() if line.startswith("| Adam lr backbone / classifier"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    lrs = [[float(x) for x in re.findall(r"\d+e-\d+", cell)] for cell in cells[1:3]]
    assert lrs[0] == pytest.approx([final.lr, final.lr * final.classifier_lr_mult])
    assert lrs[1] == pytest.approx([baseline.lr, baseline.lr * baseline.classifier_lr_mult])
    assert cells[2].endswith("(10x)") and baseline.classifier_lr_mult == 10
