"""summary.json through its one schema: files written before the schema read back unchanged,
older layouts take defaults, damaged or out-of-range figures are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brats.errors import BratsError
from brats.runs.summary import Summary

BEFORE = Path(__file__).parent / "data" / "summary_before_schema.json"  # written by evaluate.py before it


def test_a_summary_written_before_the_schema_reads_and_writes_back_the_same(tmp_path):
    old = json.loads(BEFORE.read_text())
    summary = Summary.from_json(old)
    assert [r.fold for r in summary.folds] == [0, 1, 2, 3, 4]
    assert summary.optimistic and summary.decision["rule"] == "youden"
    assert summary.folds[0].metrics["macro_f1"] == old["folds"][0]["macro_f1"]
    summary.write(tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text()) == old


def test_an_older_layout_takes_defaults():
    old = json.loads(BEFORE.read_text())
    for key in ("optimistic", "calibration", "decision", "run"):
        del old[key]
    for row in old["folds"]:
        for key in ("validated_in", "rescored_in", "max_abs_dp", "patients_compared", "is_ema"):
            del row[key]
    summary = Summary.from_json(old)
    assert summary.optimistic  # outer-fold selection, said by its protocol
    assert summary.decision == {} and summary.calibration is None
    assert summary.folds[0].max_abs_dp is None and not summary.folds[0].is_ema
    inner = dict(old, protocol="inner-validation (0.15 of each training fold chooses the epoch)")
    assert not Summary.from_json(inner).optimistic


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["folds"][0].update(auc=5.0),
        lambda d: d["folds"][0].update(rescored_val_auc=-0.1),
        lambda d: d["pooled"].update(auc=1.5),
        lambda d: d["folds"][1].update(fold="1"),
        lambda d: d.update(folds=[]),
        lambda d: d.update(decision=[0.5]),
        lambda d: d["mean_std"].pop("auc"),
    ],
)
def test_damaged_or_out_of_range_figures_are_one_line(tmp_path, change):
    d = json.loads(BEFORE.read_text())
    change(d)
    path = tmp_path / "run" / "evaluation" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(d))
    with pytest.raises(BratsError) as e:
        Summary.read(path, "rerun evaluate")
    assert str(e.value).startswith(f"{path} is corrupt") and str(e.value).endswith("rerun evaluate")
    assert "\n" not in str(e.value)
