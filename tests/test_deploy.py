"""export.py and predict.py on a tiny evaluated run."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from support import TINY_SHAPE, copy_run

from brats.cache import open_cache
from brats.errors import BratsError
from brats.evaluation import evaluate_run
from brats.inference import Grader
from brats.onnx_export import export
from brats.synthetic import make_cohort

ROOT = Path(__file__).resolve().parents[1]
# Runs a script with `import torch` failing, as on a machine without PyTorch.
NO_TORCH = (
    "import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture(scope="module")
def exported(cv_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("deploy") / "run"
    copy_run(cv_run, run)
    evaluate_run(run)
    return run, export(run)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_single_fold_export_contract_and_dynamic_batch(exported, cache20):
    run, model = exported
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    best = max(summary["folds"], key=lambda r: (r["rescored_val_auc"], -r["fold"]))
    card = json.loads((run / "model_card.json").read_text())
    assert [s["fold"] for s in card["sources"]] == [best["fold"]] and card["sources"][0]["is_ema"]
    assert card["parity_max_abs_diff"] <= 1e-4 and card["classes"] == ["LGG", "HGG"]
    assert card["contract"]["size"] == 24 and card["contract"]["modalities"] == ["t1", "t1ce", "t2", "flair"]
    proto = onnx.load(str(model))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["brats_contract"] == card["contract"]
    assert meta["brats_provenance"]["cv_summary"]["pooled"]["auc"] == pytest.approx(summary["pooled"]["auc"])
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    cached = open_cache(cache20)
    x = np.stack([np.asarray(v, dtype=np.float32) for v in cached.volumes[:5]])
    for b in (2, 5):
        probs, logits = session.run(None, {"input": x[:b]})
        assert probs.shape == (b, 2) and logits.shape == (b, 2)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_ensemble_export(exported, tmp_path):
    run, _ = exported
    out = export(run, tmp_path / "ens.onnx", ensemble=True)
    card = json.loads((tmp_path / "ens_card.json").read_text())
    assert card["ensemble"] and [s["fold"] for s in card["sources"]] == [0, 1, 2, 3, 4]
    assert card["parity_max_abs_diff"] <= 1e-4
    assert out.stat().st_size > 4 * (run / "model.onnx").stat().st_size


def test_dynamo_exporter(exported, tmp_path):
    run, _ = exported
    out = export(run, tmp_path / "dyn.onnx", fold=1, exporter="dynamo")
    card = json.loads((tmp_path / "dyn_card.json").read_text())
    assert (card["exporter"], card["opset"]) == ("dynamo", 18) and card["parity_max_abs_diff"] <= 1e-4
    assert Grader(out).contract == card["contract"]


def test_failed_parity_writes_nothing(exported, tmp_path, monkeypatch):
    import brats.onnx_export as onnx_export

    run, _ = exported
    monkeypatch.setattr(onnx_export, "check_parity", lambda *a: 0.5)
    with pytest.raises(BratsError, match="ONNX parity failed"):
        export(run, tmp_path / "bad.onnx", fold=0)
    assert list(tmp_path.iterdir()) == []


def test_predict_without_torch_reports_bad_patient_and_grades_the_rest(exported, tmp_path):
    run, model = exported
    new = tmp_path / "new"
    make_cohort(new, 4, seed=123, shape=TINY_SHAPE, prefix="NEW", workers=1)
    cases = sorted(p for g in ("HGG", "LGG") for p in (new / g).iterdir())
    bad = cases[1]
    flair = bad / f"{bad.name}_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:500])  # corrupt gzip
    out = tmp_path / "pred.csv"
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(ROOT / "predict.py"), str(model), str(new), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"{bad.name}: cannot read flair file" in r.stderr and "Traceback" not in r.stderr
    rows = {row["patient_id"]: row for row in read_csv(out)}
    assert len(rows) == 4
    assert rows[bad.name]["p_hgg"] == "" and "cannot read flair file" in rows[bad.name]["error"]
    for pid, row in rows.items():
        if pid != bad.name:
            p = float(row["p_hgg"])
            assert 0 <= p <= 1 and float(row["p_lgg"]) == pytest.approx(1 - p, abs=1e-6)
            assert row["prediction"] == ("HGG" if p >= 0.5 else "LGG") and row["error"] == ""
    assert "3 graded, 1 failed" in r.stdout


def test_predict_matches_evaluation_on_the_same_patients(exported, cache20, tmp_path):
    """Raw NIfTI -> predict.py gives the p(HGG) that evaluation computed from the cache."""
    run, model = exported
    card = json.loads((run / "model_card.json").read_text())
    k = card["sources"][0]["fold"]
    evaluated = {
        r["patient_id"]: float(r["p_hgg"])
        for r in read_csv(run / "evaluation" / "predictions.csv")
        if r["fold"] == str(k)
    }
    out = tmp_path / "p.csv"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            str(model),
            str(cache20.parent / "cohort"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = {row["patient_id"]: float(row["p_hgg"]) for row in read_csv(out)}
    assert len(got) == 20
    for pid, p in evaluated.items():
        assert got[pid] == pytest.approx(p, abs=2e-3)  # the cache holds float16 volumes


def test_single_patient_by_files(exported, cache20, tmp_path):
    run, model = exported
    case = sorted((cache20.parent / "cohort" / "HGG").iterdir())[0]
    files = [
        a for m in ("t1", "t1ce", "t2", "flair") for a in (f"--{m}", str(case / f"{case.name}_{m}.nii.gz"))
    ]
    out = tmp_path / "one.csv"
    r = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), str(model), *files, "--id", "X1", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert [row["patient_id"] for row in read_csv(out)] == ["X1"]


def test_unknown_contract_is_refused(exported, tmp_path):
    _, model = exported
    proto = onnx.load(str(model))
    for p in proto.metadata_props:
        if p.key == "brats_contract":
            contract = json.loads(p.value)
            contract["preprocess_version"] = 99
            p.value = json.dumps(contract)
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(BratsError, match="unknown preprocessing contract \\(preprocessing version 99"):
        Grader(tmp_path / "future.onnx")
