"""Every command's --help: a description, and every option's default (or that it is required),
with text in brackets shown as written."""

from __future__ import annotations

import re

import pytest
from clitools import run_cli

COMMANDS = {
    "train.py": "Train cross-validation folds",
    "evaluate.py": "Re-score every fold's best checkpoint",
    "export.py": "Export the verified best model",
    "predict.py": "Grade new patients with an exported ONNX model",
    "brats/prepare.py": "Preprocess a cohort into a cache",
    "brats/cv.py": "Train the folds of a cross-validation concurrently",
    "brats/synthetic.py": "Write a synthetic BraTS 2018-like cohort",
    "brats/ablation.py": "Before/after table of two evaluated runs",
}
# an option (with its other spelling or --no- form) or an argument, then its <metavar>
OPTION = re.compile(r"^│\s*(\*\s+)?(--[a-z0-9-]+|[a-z_]+)(?:,--[a-z0-9-]+)?\s+(?:--[a-z0-9-]+\s+)?<")


def option_blocks(text: str) -> dict[str, str]:
    """Each option's (or argument's) lines of a Rich --help panel, joined."""
    blocks: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = OPTION.match(line)
        if m:
            name = m.group(2)
            blocks[name] = line
        elif line.startswith("│") and name:
            blocks[name] += " " + line.strip("│ ")
        else:
            name = None
    return blocks


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_help_describes_the_command_and_shows_every_default(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    r = run_cli(capsys, script, "--help")
    assert r.code == 0, r.err
    assert COMMANDS[script] in r.out
    blocks = option_blocks(r.out)
    options = {k: v for k, v in blocks.items() if k.startswith("--") and k != "--help"}
    assert options, r.out
    missing = [k for k, v in options.items() if "default:" not in v and "[required]" not in v]
    assert not missing, missing


def test_bracketed_defaults_are_shown_as_written(capsys, monkeypatch):
    """Rich markup would swallow "[best]"; help is rendered as Markdown instead."""
    monkeypatch.setenv("COLUMNS", "250")
    blocks = option_blocks(run_cli(capsys, "train.py", "--help").out)
    assert "[default: best]" in blocks["--select"] and "[default: 60]" in blocks["--max-epochs"]
    assert "[default: 15; baseline: 10]" in blocks["--min-epochs"] and "[default: 1e-4]" in blocks["--lr"]
    assert "[default: strided; medicalnet with --pretrained]" in blocks["--layout"]
    assert "[default: inverse_freq]" in blocks["--sampler"] and "[default: auto]" in blocks["--cache-device"]
    out = run_cli(capsys, "train.py", "--help").out
    for panel in ("Data and folds", "Model", "Optimisation", "Policy", "Hardware", "Run"):
        assert f"─ {panel}" in out
    assert "--k-folds,--folds" in out  # K, under its own name; the old spelling still works
