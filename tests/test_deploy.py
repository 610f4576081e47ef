"""export.py and predict.py on a tiny evaluated run."""

import contextlib
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import SimpleITK as sitk
from clitools import deny_writes, disk_full, one_line_error, run_cli, temps
from support import TINY_SHAPE, copy_run

from brats.data.cache_reader import open_cache
from brats.data.cohort import find_cases
from brats.data.phantom import make_cohort
from brats.deploy.inference import Grader
from brats.errors import BratsError
from brats.evaluation.cross_validation import evaluate_run
from brats.evaluation.export import export
from brats.runs.paths import RunPaths

ROOT = Path(__file__).resolve().parents[1]
# Runs a script with `import torch` failing, as on a machine without PyTorch.
NO_TORCH = (
    "import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


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
    names = ["probabilities", "logits", "cam", "fold_p_hgg", "feature_distance"]
    assert [o.name for o in session.get_outputs()] == names
    assert list(card["outputs"]) == names
    assert card["cam_parity_max_rel_diff"] <= 1e-4
    for b in (2, 5):
        probs, logits, cam, fold_p, distance = session.run(None, {"input": x[:b]})
        assert probs.shape == (b, 2) and logits.shape == (b, 2) and cam.shape == (b, 24, 24, 24)
        assert fold_p.shape == (b, 1) and distance.shape == (b,) and (distance > 0).all()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(fold_p[:, 0], probs[:, 1], atol=1e-6)  # one fold: its own p(HGG)


def test_ensemble_export(exported, cache20, tmp_path):
    import torch

    from brats.evaluation.export import load_fold
    from brats.models.explained import class_activation_map

    run, _ = exported
    out = export(run, tmp_path / "ens.onnx", ensemble=True)
    card = json.loads((tmp_path / "ens_card.json").read_text())
    assert card["ensemble"] and [s["fold"] for s in card["sources"]] == [0, 1, 2, 3, 4]
    assert card["parity_max_abs_diff"] <= 1e-4 and card["cam_parity_max_rel_diff"] <= 1e-4
    assert out.stat().st_size > 4 * (run / "model.onnx").stat().st_size
    # no test set: the decision was fitted on single fold models, and the card says its transfer is unmeasured
    perf = card["performance"]
    assert perf["decision_fitted_on"] == "single_fold_out_of_fold" and "unmeasured" in perf["transfer"]
    assert perf["expected"].startswith("unmeasured for the ensemble") and perf["fold_logit_sd"]["q90"] > 0
    # Its map is the mean of the folds' maps, each fold's model as the policy chose it.
    x = np.stack([np.asarray(v, dtype=np.float32) for v in open_cache(cache20).volumes[:2]])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    cam = session.run(["cam"], {"input": x})[0]
    run_cfg = json.loads((run / "config.json").read_text())
    with torch.no_grad():
        folds = [
            class_activation_map(load_fold(run, k, run_cfg, False)[0], torch.from_numpy(x)) for k in range(5)
        ]
    expected = torch.stack(folds).mean(0).numpy()
    np.testing.assert_allclose(cam, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_dynamo_exporter(exported, tmp_path):
    run, _ = exported
    out = export(run, tmp_path / "dyn.onnx", fold=1, exporter="dynamo")
    card = json.loads((tmp_path / "dyn_card.json").read_text())
    assert (card["exporter"], card["opset"]) == ("dynamo", 18) and card["parity_max_abs_diff"] <= 1e-4
    assert Grader(out).contract == card["contract"]


def test_failed_parity_writes_nothing(exported, tmp_path, monkeypatch):
    import brats.evaluation.export as onnx_export

    run, _ = exported
    monkeypatch.setattr(onnx_export, "check_parity", lambda *a: {"probabilities": 0.5, "cam": 0.0})
    with pytest.raises(BratsError, match="ONNX parity failed: max"):
        export(run, tmp_path / "bad.onnx", fold=0)
    assert list(tmp_path.iterdir()) == []


def test_failed_cam_parity_writes_nothing(exported, tmp_path, monkeypatch):
    """A graph whose map drifts from torch's is refused like one whose probabilities do."""
    import torch

    import brats.models.explained as explain

    run, _ = exported
    real = explain.upsample

    def drifts_in_the_graph(maps, size):  # torch's own map, computed outside the trace, is exact
        return real(maps, size) * (1.01 if torch.jit.is_tracing() else 1.0)

    monkeypatch.setattr(explain, "upsample", drifts_in_the_graph)
    with pytest.raises(BratsError, match="ONNX parity failed on the CAM"):
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
            # the input checks and the model's doubt need no torch either
            assert (
                row["qc"] in ("pass", "warn")
                and row["ood"] in ("yes", "no")
                and float(row["ood_distance"]) > 0
            )
    assert "3 graded, 1 failed" in r.stdout


# Also refuses matplotlib: predict's install has neither.
NO_TORCH_NOR_MATPLOTLIB = NO_TORCH.replace(
    "sys.modules['torch'] = None", "sys.modules['torch'] = sys.modules['matplotlib'] = None"
)


def without_cam(model: Path, out: Path) -> Path:
    """`model` as exported before the graph had a CAM output: that output removed."""
    proto = onnx.load(str(model))
    kept = [o for o in proto.graph.output if o.name != "cam"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(out))
    return out


def test_predict_cam_without_torch_writes_each_patients_map_on_its_own_grid(exported, tmp_path):
    from brats.data.preprocess import PreprocessConfig, preprocess_with_grid
    from brats.deploy.cam import cam_on_reference

    _, model = exported
    new = new_patients(tmp_path, 3)
    out, cams = tmp_path / "pred.csv", tmp_path / "cams"
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH_NOR_MATPLOTLIB, str(ROOT / "predict.py"), str(model), str(new)]
        + ["--out", str(out), "--cam", str(cams)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote 3 class activation map(s) to {cams}" in r.stdout
    rows = {row["patient_id"]: row for row in read_csv(out)}
    cases = find_cases(new).cases
    assert sorted(p.name for p in cams.iterdir()) == sorted(
        f"{c.patient_id}_cam.{ext}" for c in cases for ext in ("nii.gz", "png")
    )
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for case in cases:
        flair = sitk.ReadImage(str(case.path("flair")))
        written = sitk.ReadImage(str(cams / f"{case.patient_id}_cam.nii.gz"))
        for get in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
            assert getattr(written, get)() == pytest.approx(getattr(flair, get)(), abs=1e-5)
        # the graph's own map of this patient, mapped back by the grid preprocessing used
        volume, grid = preprocess_with_grid(case, PreprocessConfig(size=24))
        p, cam = session.run(["probabilities", "cam"], {"input": volume[None]})
        expected = sitk.GetArrayFromImage(cam_on_reference(cam[0], grid, flair))
        np.testing.assert_allclose(sitk.GetArrayFromImage(written), expected, atol=1e-5)
        assert float(rows[case.patient_id]["p_hgg"]) == pytest.approx(float(p[0, 1]), abs=1e-5)
        png = cams / f"{case.patient_id}_cam.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_cam_with_a_model_exported_before_cams(exported, tmp_path, capsys):
    _, model = exported
    old = without_cam(model, tmp_path / "old.onnx")
    new = new_patients(tmp_path)
    out, cams = tmp_path / "pred.csv", tmp_path / "cams"
    r = run_cli(capsys, "predict.py", old, new, "--out", out)
    assert r.code == 0, r.err  # grading needs no CAM
    assert len(read_csv(out)) == 2
    out.unlink()
    err = one_line_error(run_cli(capsys, "predict.py", old, new, "--out", out, "--cam", cams))
    assert str(old) in err and "no CAM output" in err and "export.py" in err
    assert not out.exists() and not cams.exists()  # refused before any patient was read


def test_predict_cam_folder_checked_before_grading(exported, tmp_path, capsys):
    _, model = exported
    new = new_patients(tmp_path)
    taken = tmp_path / "taken"
    taken.write_text("x")
    err = one_line_error(
        run_cli(capsys, "predict.py", model, new, "--out", tmp_path / "p.csv", "--cam", taken)
    )
    assert "--cam" in err and str(taken) in err
    assert not (tmp_path / "p.csv").exists()


def test_a_map_that_cannot_be_written_is_reported_and_the_others_are_written(exported, tmp_path, capsys):
    _, model = exported
    new = new_patients(tmp_path, 3)
    ids = sorted(c.patient_id for c in find_cases(new).cases)
    cams = tmp_path / "cams"
    (cams / f"{ids[1]}_cam.nii.gz").mkdir(parents=True)  # a folder where its map goes
    out = tmp_path / "pred.csv"
    r = run_cli(capsys, "predict.py", model, new, "--out", out, "--cam", cams)
    assert r.code == 1 and "Traceback" not in r.err
    assert f"{ids[1]}: cannot write {cams / f'{ids[1]}_cam.nii.gz'}" in r.err
    assert "1 patient(s) graded, but their CAM was not written" in r.err
    rows = {row["patient_id"]: row for row in read_csv(out)}
    assert sorted(rows) == ids and all(row["p_hgg"] and not row["error"] for row in rows.values())
    for pid in (ids[0], ids[2]):
        assert (cams / f"{pid}_cam.nii.gz").is_file() and (cams / f"{pid}_cam.png").is_file()
    assert temps(cams) == []


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


# --- the model's graph, its contract and the cache must agree


def resized_cache(cache20: Path, tmp_path: Path, size: int) -> Path:
    """A copy of the run's cache, then prepared again in place at another --size."""
    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig

    cache = tmp_path / "cache"
    shutil.copytree(cache20, cache)
    prepare(
        find_cases(cache20.parent / "cohort").cases,
        cache,
        PreprocessConfig(size=size),
        progress=False,
        replace=True,
    )
    assert json.loads((cache / "index.json").read_text())["preprocess"]["size"] == size
    return cache


def point_run_at(run: Path, data: Path) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] = str(data)
    (run / "config.json").write_text(json.dumps(cfg))


def set_contract(model: Path, out: Path, contract: dict) -> Path:
    proto = onnx.load(str(model))
    for p in proto.metadata_props:
        if p.key == "brats_contract":
            p.value = json.dumps(contract)
    onnx.save(proto, str(out))
    return out


def test_export_refuses_a_cache_prepared_again_at_another_size(exported, cache20, tmp_path, capsys):
    run = copy_run(exported[0], tmp_path / "run")
    point_run_at(run, resized_cache(cache20, tmp_path, 32))
    err = one_line_error(
        run_cli(capsys, "export.py", "--run", run, "--fold", 0, "--out", tmp_path / "m.onnx")
    )
    assert str(tmp_path / "cache") in err and "best_ema.pt" in err and "size 32" in err and "24" in err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m_card.json").exists()


def test_export_checks_the_graph_against_its_contract(exported, cache20, tmp_path):
    from brats.data.preprocess import PreprocessConfig
    from brats.deploy.inference import CONTRACT_KEY
    from brats.evaluation.export import load_fold, write_onnx
    from brats.models.explained import ExplainedModel

    run, _ = exported
    model, _ = load_fold(run, 0, json.loads((run / "config.json").read_text()), trust=False)
    x = np.stack([np.asarray(v, dtype=np.float32) for v in open_cache(cache20).volumes[:3]])  # 24^3
    contract = PreprocessConfig(size=32).to_contract()
    with pytest.raises(BratsError, match="graph takes input .*4, 24, 24, 24.* contract .*4, 32, 32, 32"):
        write_onnx(ExplainedModel([model]).eval(), x, tmp_path / "m.onnx", {CONTRACT_KEY: contract})
    assert list(tmp_path.iterdir()) == []


def test_predict_checks_graph_against_contract_before_any_preprocessing(exported, cache20, tmp_path, capsys):
    _, model = exported
    card = json.loads(RunPaths.card(model).read_text())
    bad = set_contract(model, tmp_path / "bad.onnx", {**card["contract"], "size": 32})
    with pytest.raises(BratsError, match="bad.onnx: its graph takes input .*24, 24, 24.* contract"):
        Grader(bad)
    out = tmp_path / "p.csv"
    err = one_line_error(run_cli(capsys, "predict.py", bad, cache20.parent / "cohort", "--out", out))
    assert "export.py" in err and not out.exists()


def test_model_exported_with_the_previous_contract_format_predicts_identically(exported, cache20, tmp_path):
    _, model = exported
    card = json.loads(RunPaths.card(model).read_text())
    old = {
        "modalities": card["contract"]["modalities"],
        "size": card["contract"]["size"],
        "orientation": "LPS",
        "normalization": "zscore-brain",
        "preprocess_version": 1,
        "input": "float32 (B, C, S, S, S), channels in `modalities` order",
    }
    legacy = set_contract(model, tmp_path / "legacy.onnx", old)
    cases = find_cases(cache20.parent / "cohort").cases[:3]
    now, before = Grader(model).grade(cases), Grader(legacy).grade(cases)
    assert [p.p_hgg for p in before] == [p.p_hgg for p in now] and all(p.p_hgg is not None for p in now)


# --- outputs checked before the work; one line on failure, nothing half-written


def new_patients(tmp_path: Path, n: int = 2) -> Path:
    new = tmp_path / "new"
    make_cohort(new, n, seed=5, shape=TINY_SHAPE, prefix="NEW", workers=1)
    return new


def test_predict_out_in_a_missing_folder_is_created(exported, tmp_path, capsys):
    _, model = exported
    out = tmp_path / "a" / "b" / "pred.csv"
    r = run_cli(capsys, "predict.py", model, new_patients(tmp_path), "--out", out)
    assert r.code == 0, r.err
    assert len(read_csv(out)) == 2


@pytest.mark.parametrize("where", ["folder", "under_a_file", "read_only"])
def test_predict_bad_out_is_one_line_before_grading(exported, tmp_path, capsys, where):
    _, model = exported
    new = new_patients(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    if where == "folder":
        out = target
    elif where == "under_a_file":
        (target / "file.txt").write_text("x")
        out = target / "file.txt" / "pred.csv"
    else:
        out = target / "pred.csv"
    with deny_writes(target) if where == "read_only" else contextlib.nullcontext():
        r = run_cli(capsys, "predict.py", model, new, "--out", out)
    err = one_line_error(r)
    assert str(target) in err
    assert "patient(s)" not in r.out  # refused before any patient was read
    assert [p.name for p in target.iterdir()] == ([] if where != "under_a_file" else ["file.txt"])


def test_predict_on_a_full_disk_keeps_the_previous_csv(exported, tmp_path, capsys, monkeypatch):
    _, model = exported
    out = tmp_path / "pred.csv"
    out.write_text("patient_id,p_hgg,p_lgg,prediction\nprevious results\n")
    new = new_patients(tmp_path)
    disk_full(monkeypatch)
    err = one_line_error(run_cli(capsys, "predict.py", model, new, "--out", out))
    assert "disk is full" in err and str(out) in err
    assert out.read_text().endswith("\nprevious results\n") and temps(tmp_path) == []


def test_predict_replaces_an_existing_csv_and_says_so(exported, tmp_path, capsys):
    _, model = exported
    new = new_patients(tmp_path)
    out = tmp_path / "pred.csv"
    r = run_cli(capsys, "predict.py", model, new, "--out", out)
    assert r.code == 0 and "replaced" not in r.out
    out.write_text("patient_id,p_hgg,p_lgg,prediction\nold\n")  # the only kind --out replaces
    r = run_cli(capsys, "predict.py", model, new, "--out", out)
    assert r.code == 0, r.err
    assert f"wrote {out} (replaced the previous file): 2 graded, 0 failed" in r.out
    assert len(read_csv(out)) == 2 and temps(tmp_path) == []


def test_same_patient_given_twice_is_graded_once(exported, tmp_path, capsys):
    _, model = exported
    new = new_patients(tmp_path, 3)
    one = sorted((new / "HGG").iterdir())[0] if (new / "HGG").is_dir() else None
    one = one or sorted((new / "LGG").iterdir())[0]
    out = tmp_path / "pred.csv"
    r = run_cli(capsys, "predict.py", model, new, one, new, "--out", out)
    assert r.code == 0, r.err
    rows = read_csv(out)
    assert sorted(row["patient_id"] for row in rows) == sorted(c.patient_id for c in find_cases(new).cases)
    assert f"{one.name}: given 3 times, graded once" in r.out
    assert "3 graded, 0 failed" in r.out


@pytest.mark.parametrize("n", ["0", "-2"])
def test_predict_batch_size_checked_before_anything(tmp_path, capsys, n):
    err = one_line_error(
        run_cli(capsys, "predict.py", tmp_path / "missing.onnx", tmp_path, "--batch-size", n)
    )
    assert f"--batch-size {n}" in err


# --- export on the folds that exist, options that exist


def test_export_after_training_one_fold_only(exported, tmp_path, capsys):
    run = copy_run(exported[0], tmp_path / "run")
    shutil.rmtree(run / "evaluation")
    (run / "model.onnx").unlink()
    for k in (0, 2, 3, 4):
        shutil.rmtree(run / f"fold_{k}")
    r = run_cli(capsys, "export.py", "--run", run, "--fold", 1)
    assert r.code == 0, r.err[-3000:]
    card = json.loads((run / "model_card.json").read_text())
    assert [s["fold"] for s in card["sources"]] == [1]
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert [row["fold"] for row in summary["folds"]] == [1]
    r = run_cli(capsys, "export.py", "--run", run, "--out", tmp_path / "best.onnx")  # best of the folds there
    assert r.code == 0, r.err[-3000:]
    err = one_line_error(run_cli(capsys, "export.py", "--run", run, "--fold", 3))
    assert "--fold 3" in err and "fold_3" in err


def test_export_messages_name_existing_options(exported, tmp_path, capsys):
    """Every option an export error advises exists in export.py --help."""
    import re

    run = copy_run(exported[0], tmp_path / "run")
    shutil.rmtree(run / "evaluation")
    shutil.rmtree(run / "fold_2")
    (run / "fold_0" / "best_ema.pt").unlink()
    (run / "fold_0" / "best.pt").unlink()
    help_text = run_cli(capsys, "export.py", "--help").out
    for args in (
        ["--fold", 2],
        ["--fold", 9],
        ["--fold", 0],
        ["--ensemble", "--fold", 1],
        ["--exporter", "x"],
    ):
        err = one_line_error(run_cli(capsys, "export.py", "--run", run, *args))
        for option in re.findall(r"--[a-z][a-z-]+", err):
            assert option in help_text, (option, err)


def test_export_removes_stale_temps_of_a_killed_export(exported, tmp_path, capsys):
    run = copy_run(exported[0], tmp_path / "run")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = run / f".tmp-{int(dead.stdout)}-model.onnx.part"
    stale.write_bytes(b"\0" * 1000)
    r = run_cli(capsys, "export.py", "--run", run, "--fold", 0)
    assert r.code == 0, r.err[-3000:]
    assert not stale.exists() and temps(run) == []


def test_export_data_option_scores_a_moved_cache(exported, cache20, tmp_path, capsys):
    run = copy_run(exported[0], tmp_path / "run")
    shutil.rmtree(run / "evaluation")
    moved = tmp_path / "moved_cache"
    shutil.copytree(cache20, moved)
    point_run_at(run, tmp_path / "gone")
    r = run_cli(capsys, "export.py", "--run", run, "--fold", 2, "--data", moved, "--out", tmp_path / "m.onnx")
    assert r.code == 0, r.err[-3000:]
    assert json.loads((tmp_path / "m_card.json").read_text())["sources"][0]["fold"] == 2


@pytest.mark.parametrize("where", ["folder", "under_a_file", "read_only"])
def test_export_bad_out_is_one_line_before_evaluating(exported, tmp_path, capsys, where):
    run = copy_run(exported[0], tmp_path / "run")
    shutil.rmtree(run / "evaluation")
    target = tmp_path / "target"
    target.mkdir()
    out = {"folder": target, "under_a_file": target / "f" / "m.onnx", "read_only": target / "m.onnx"}[where]
    if where == "under_a_file":
        (target / "f").write_text("x")
    with deny_writes(target) if where == "read_only" else contextlib.nullcontext():
        err = one_line_error(run_cli(capsys, "export.py", "--run", run, "--out", out))
    assert str(target) in err
    assert not (run / "evaluation").exists()  # refused before the work
    assert [p.name for p in target.iterdir()] == ([] if where != "under_a_file" else ["f"])


def test_export_on_a_full_disk_writes_nothing(exported, tmp_path, capsys, monkeypatch):
    run = copy_run(exported[0], tmp_path / "run")
    before = (run / "model.onnx").read_bytes(), (run / "model_card.json").read_text()
    disk_full(monkeypatch)
    err = one_line_error(run_cli(capsys, "export.py", "--run", run, "--fold", 3))
    assert "disk is full" in err
    assert ((run / "model.onnx").read_bytes(), (run / "model_card.json").read_text()) == before
    assert temps(run) == []


@pytest.mark.parametrize("content", ["garbage{", '{"folds": [{"fold": "x"}]}'])
def test_export_re_evaluates_a_corrupt_summary(exported, tmp_path, capsys, content):
    run = copy_run(exported[0], tmp_path / "run")
    (run / "evaluation" / "summary.json").write_text(content)
    shutil.rmtree(run / "fold_3")
    shutil.rmtree(run / "fold_4")
    r = run_cli(capsys, "export.py", "--run", run, "--out", tmp_path / "m.onnx")
    assert r.code == 0, r.err[-3000:]
    assert [
        row["fold"] for row in json.loads((run / "evaluation" / "summary.json").read_text())["folds"]
    ] == [
        0,
        1,
        2,
    ]


@pytest.mark.parametrize(
    "content", ["garbage{", '{"depth": 10, "fold', "[1, 2]", '{"depth": "ten", "data": "x"}']
)
def test_corrupt_run_config_is_one_line(exported, tmp_path, capsys, content):
    run = copy_run(exported[0], tmp_path / "run")
    (run / "config.json").write_text(content)
    for script in ("export.py", "evaluate.py"):
        err = one_line_error(run_cli(capsys, script, "--run", run))
        assert str(run / "config.json") in err and "train.py" in err


def test_calibrated_decision_travels_from_evaluation_to_predict(cv_run, cache20, tmp_path):
    """evaluate --calibrate temperature --threshold youden -> summary.json -> the exported model's
    contract and card -> predict.py, which calibrates, applies the threshold, shows it in the CSV,
    and lets --threshold override it."""
    from brats.deploy.contract import Decision

    run = copy_run(cv_run, tmp_path / "run")
    summary = evaluate_run(run, calibrate="temperature", threshold="youden")
    decision = Decision.from_dict(summary.decision, "summary")
    assert decision.calibration == "temperature" and decision.rule == "youden"
    assert decision.slope > 0 and 0 < decision.threshold < 1 and decision.intercept == 0
    cal = summary.calibration
    for part in ("raw", "calibrated"):
        assert 0 <= cal[part]["brier"] <= 1 and 0 <= cal[part]["ece"] <= 1 and cal[part]["reliability"]
    assert cal["how"].startswith("cross-fitted") and (run / "evaluation" / "reliability.png").stat().st_size
    assert "reflect a 50/50 prior" in (run / "evaluation" / "report.md").read_text()
    evaluated = read_csv(run / "evaluation" / "predictions.csv")
    for row in evaluated:  # the CSV keeps the raw p(HGG) beside the calibrated one
        assert float(row["p_hgg_calibrated"]) == pytest.approx(decision.calibrate([float(row["p_hgg"])])[0])

    model = export(run)
    card = json.loads(RunPaths.card(model).read_text())
    assert card["contract"]["decision"] == summary.decision
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(model)).metadata_props}
    assert meta["brats_contract"]["decision"] == summary.decision

    k = card["sources"][0]["fold"]
    raw = {r["patient_id"]: float(r["p_hgg"]) for r in evaluated if r["fold"] == str(k)}

    def predict(*extra: str, patients: Path = cache20.parent / "cohort") -> tuple[dict, str]:
        out = tmp_path / "p.csv"
        cmd = [sys.executable, str(ROOT / "predict.py"), str(model), str(patients)]
        r = subprocess.run([*cmd, "--out", str(out), *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return {row["patient_id"]: row for row in read_csv(out)}, r.stdout

    rows, stdout = predict()
    said = " ".join(stdout.split())  # the paragraph about the model, unwrapped
    assert (
        f"is at least {decision.threshold:.2f}, the threshold at which sensitivity plus specificity" in said
    )
    # the cohort the model trained on: said, and left out of any new-patient accuracy
    assert "20 graded patient(s) are in the model's training cohort (by id)" in stdout
    assert {row["trained_on"] for row in rows.values()} == {"yes"}
    assert "match the grade on disk" not in stdout
    # new patients whose grades are on disk: accuracy with its CI, beside the out-of-fold figure
    _, stdout = predict(patients=new_patients(tmp_path, 3))
    assert "graded patients match the grade on disk (95% CI " in stdout
    oof = summary.calibration["operating_point"]["accuracy"]
    assert f"each on patients it never trained on) at the same decision: accuracy {oof:.2f}" in stdout
    for pid, p in raw.items():
        row = rows[pid]
        assert float(row["p_hgg"]) == pytest.approx(decision.calibrate([p])[0], abs=3e-3)
        assert float(row["threshold"]) == pytest.approx(decision.threshold, rel=1e-5)
        assert row["prediction"] == ("HGG" if float(row["p_hgg"]) >= decision.threshold else "LGG")
    rows, stdout = predict("--threshold", "0.999", patients=tmp_path / "new")
    assert "(--threshold)" in stdout and f"was measured at threshold {decision.threshold:.4g}" in stdout
    assert {row["threshold"] for row in rows.values()} == {"0.999"} and len(rows) == 3
    assert all(
        row["prediction"] == ("HGG" if float(row["p_hgg"]) >= 0.999 else "LGG") for row in rows.values()
    )


def test_wilson_interval_of_a_small_check():
    sys.path.insert(0, str(ROOT))
    from brats.deploy.report import wilson_interval

    lo, hi = wilson_interval(5, 8)
    assert (round(lo, 4), round(hi, 4)) == (0.3057, 0.8632)
    assert wilson_interval(0, 4)[0] == 0.0 and wilson_interval(4, 4)[1] == 1.0


def test_new_patients_beside_the_out_of_fold_accuracy_say_why_they_differ():
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    from brats.deploy.report import compare_out_of_fold

    point = {"accuracy": 0.87, "sensitivity": 0.84, "specificity": 0.94}
    cv = {"calibration": {"operating_point": point}, "pooled": {"n": 60}, "optimistic": False}

    def grader(ensemble: bool, optimistic: bool):
        provenance = {"cv_summary": {**cv, "optimistic": optimistic}, "ensemble": ensemble}
        return SimpleNamespace(provenance=provenance, decision=SimpleNamespace(threshold=0.7))

    agree = compare_out_of_fold(grader(True, False), None, 17, 20)  # 0.85 beside 0.87 of 60
    assert "accuracy 0.87" in agree and "over 60 patients" in agree
    assert "new minus evaluated -0.02 (95% CI" in agree and agree.endswith("the difference is within chance")
    apart = compare_out_of_fold(grader(True, False), None, 8, 20)
    assert "more than chance separates the two" in apart and "the ensemble averages" in apart
    assert "optimistic" not in apart  # the last epoch of each fold: nothing was chosen on the scored fold
    single = compare_out_of_fold(grader(False, True), None, 8, 20)
    assert "optimistic" in single and "ensemble" not in single
    assert "not at --threshold 0.5" in compare_out_of_fold(grader(False, False), 0.5, 8, 20)


def test_newcombe_interval_of_a_difference_of_two_proportions():
    """Newcombe (Statistics in Medicine 1998), method 10, his worked examples."""
    from brats.deploy.report import newcombe_interval

    assert [round(v, 4) for v in newcombe_interval(56, 70, 48, 80)] == [0.0524, 0.3339]
    assert [round(v, 4) for v in newcombe_interval(9, 10, 3, 10)] == [0.1705, 0.8090]


def test_an_ensemble_with_a_test_set_is_compared_with_its_own_test_set_figures():
    from types import SimpleNamespace

    from brats.deploy.report import compare_out_of_fold, describe_model

    test = {"n": 30, "operating_point": {"accuracy": 0.9, "sensitivity": 0.95, "specificity": 0.75}}
    perf = {
        "decision_fitted_on": "ensemble_test_set",
        "test_set": test,
        "expected": "test-set AUC 0.930 on 30",
    }
    provenance = {"performance": perf, "ensemble": True, "cv_summary": {"pooled": {"n": 60}}}
    decision = SimpleNamespace(threshold=0.6, calibration="none", rule="youden", slope=1.0, intercept=0.0)
    grader = SimpleNamespace(provenance=provenance, decision=decision, threshold=0.6)
    said = compare_out_of_fold(grader, None, 18, 20)
    assert said.startswith(
        "the ensemble on its held-out test set (cross-fitted) at the same decision: accuracy 0.90"
    )
    assert "over 30 patients" in said and "each fold model's probabilities" not in said
    grader.cfg, grader.path = SimpleNamespace(modalities=("t1", "flair")), Path("m.onnx")
    grader.provenance["performance"]["test_set"] = {**test, "auc": 0.93, "auc_ci95": [0.8, 1.0]}
    said = " ".join(describe_model(grader, None).split())
    assert said.startswith("This model grades a glioma as HGG or LGG from T1, FLAIR scans in BraTS space")
    assert "On 30 patients held out of all training: AUC 0.93 (95% CI 0.80-1.00)" in said
    assert "is at least 0.60, the threshold at which sensitivity plus specificity is highest" in said
    assert "on the held-out patients" in said and said.endswith("Details: m_card.md.")
    unmeasured = {"transfer": "its transfer is unmeasured", "fold_logit_sd": {"median": 0.8}}
    grader.provenance = {**provenance, "performance": unmeasured}
    said = " ".join(describe_model(grader, 0.7).split())
    assert "unmeasured (its fold models' logits differ by SD 0.80 per patient" in said
    assert "called HGG when its probability of HGG is at least 0.7 (--threshold)" in said
    empty = SimpleNamespace(provenance={}, decision=SimpleNamespace(threshold=0.5))
    assert "not in this model's metadata" in compare_out_of_fold(empty, None, 0, 1)


def test_predict_on_cuda_without_onnxruntime_gpu_is_one_line_and_threads_are_set(exported, tmp_path, capsys):
    import onnxruntime

    from brats.deploy.inference import execution_providers

    _, model = exported
    new = tmp_path / "new"
    make_cohort(new, 2, seed=5, shape=TINY_SHAPE, workers=1)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():  # a machine with onnxruntime-gpu
        assert (
            execution_providers("cuda", onnxruntime.get_available_providers())[0] == "CUDAExecutionProvider"
        )
    else:
        err = one_line_error(
            run_cli(capsys, "predict.py", model, new, "--device", "cuda", "--out", tmp_path / "p.csv")
        )
        assert "no CUDA provider" in err and "pip uninstall onnxruntime && pip install onnxruntime-gpu" in err
        assert not (tmp_path / "p.csv").exists()
    assert execution_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    grader = Grader(model, threads=1)
    assert grader.session.get_session_options().intra_op_num_threads == 1
