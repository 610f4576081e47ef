"""Never destroy a user's file, never score the wrong model: every case is a file a user has, and
the command refuses it in one line before doing any work, leaving every file as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import one_line_error, run_cli
from support import TINY_SHAPE, alive, copy_run, descendants, eventually

from brats.data.phantom import make_cohort


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_patients(tmp_path: Path, n: int = 2) -> Path:
    new = tmp_path / "new"
    make_cohort(new, n, seed=5, shape=TINY_SHAPE, prefix="NEW", workers=1)
    return new


def first_case(cohort: Path) -> Path:
    return sorted(p for g in ("HGG", "LGG") if (cohort / g).is_dir() for p in (cohort / g).iterdir())[0]


# --- 1. outputs never destroy inputs


@pytest.fixture
def model_copy(exported, tmp_path) -> Path:
    model = tmp_path / "m.onnx"
    shutil.copy(exported[1], model)
    return model


def test_predict_out_never_replaces_the_model_or_a_scan(model_copy, tmp_path, capsys):
    new = new_patients(tmp_path)
    t1 = next(first_case(new).glob("*_t1.nii.gz"))
    link = tmp_path / "link.csv"
    link.symlink_to(model_copy)
    hard = tmp_path / "hard.csv"
    os.link(t1, hard)
    before = {p: digest(p) for p in (model_copy, t1)}
    for out, what in (
        (model_copy, "the model"),
        (link, "the model"),
        (t1, "'s t1 scan"),
        (hard, "'s t1 scan"),
    ):
        r = run_cli(capsys, "predict.py", model_copy, new, "--out", out)
        err = one_line_error(r)
        assert what in err and "choose another path" in err, err
        assert "patient(s)" not in r.out  # refused before any patient was read
    assert {p: digest(p) for p in before} == before


def test_predict_out_replaces_only_a_predictions_csv(model_copy, tmp_path, capsys):
    new = new_patients(tmp_path)
    notes = tmp_path / "notes.csv"
    notes.write_text("my notes, not predictions\n")
    err = one_line_error(run_cli(capsys, "predict.py", model_copy, new, "--out", notes))
    assert "is not a predictions CSV" in err and str(notes) in err
    assert notes.read_text() == "my notes, not predictions\n"


def test_predict_cam_folder_is_never_a_patients_folder(model_copy, tmp_path, capsys):
    new = new_patients(tmp_path)
    case = first_case(new)
    files = sorted(p.name for p in case.iterdir())
    err = one_line_error(
        run_cli(capsys, "predict.py", model_copy, new, "--cam", case, "--out", tmp_path / "p.csv")
    )
    assert "--cam" in err and "folder" in err
    assert sorted(p.name for p in case.iterdir()) == files


def test_export_out_never_replaces_a_checkpoint_or_another_file(exported, tmp_path, capsys):
    run = copy_run(exported[0], tmp_path / "run")
    best = run / "fold_0" / "best_ema.pt"
    before = digest(best)
    link = tmp_path / "x.onnx"
    link.symlink_to(best)
    other = tmp_path / "y.onnx"
    other.write_text("not a model")
    card = tmp_path / "z_card.json"
    card.write_text('{"mine": 1}')
    notes = tmp_path / "w_card.md"
    notes.write_text("# my notes on w")
    for out, said in (
        (best, "ends in .onnx"),
        (link, "fold 0's best_ema.pt"),
        (other, "is not an ONNX model"),
        (tmp_path / "z.onnx", "is not a model card"),
        (tmp_path / "w.onnx", "is not a model card"),
    ):
        r = run_cli(capsys, "export.py", "--run", run, "--fold", "1", "--out", out)
        assert said in one_line_error(r), r.err
    assert digest(best) == before and other.read_text() == "not a model" and card.read_text() == '{"mine": 1}'
    assert notes.read_text() == "# my notes on w" and not (tmp_path / "w_card.json").exists()


def test_evaluate_never_writes_into_the_cache_through_a_link(cv_run, cache20, tmp_path, capsys):
    run = copy_run(cv_run, tmp_path / "run")
    (run / "evaluation").symlink_to(cache20, target_is_directory=True)
    listing = sorted(p.name for p in cache20.iterdir())
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", run, "--folds", "0"))
    assert "the cache" in err and "evaluation folder" in err
    assert sorted(p.name for p in cache20.iterdir()) == listing


# --- 2. a transactional cache


def cohort_and_cache(tmp_path: Path, n: int = 6) -> tuple[Path, Path]:
    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig

    cohort = tmp_path / "cohort"
    make_cohort(cohort, n, seed=4, shape=TINY_SHAPE, workers=1)
    prepare(
        find_cases(cohort).cases,
        tmp_path / "cache",
        PreprocessConfig(size=TINY_SIZE),
        workers=1,
        progress=False,
    )
    return cohort, tmp_path / "cache"


def test_a_failed_prepare_leaves_the_previous_index_and_every_volume_it_lists(tmp_path):
    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cache_reader import open_cache, verify_volumes
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig

    cohort, cache = cohort_and_cache(tmp_path)
    cases = find_cases(cohort).cases
    for i, case in enumerate(cases):  # every patient changed: each gets a new volume
        os.utime(case.paths[0], ns=(10**18 + i, 10**18 + i))
    cases[2].paths[1].write_bytes(b"\x1f\x8b broken")  # and one of them now fails
    result = prepare(cases, cache, PreprocessConfig(size=TINY_SIZE), workers=1, progress=False)
    assert len(result.failed) == 1 and len(result.written) == 5 and not result.index_written
    cached = open_cache(cache)  # the previous index: every volume it lists is there, whole
    verify_volumes(cached, range(len(cached)))
    assert len(cached) == 6


def test_a_failing_patient_whose_id_holds_a_colon_is_left_out_of_the_index(tmp_path):
    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cache_reader import open_cache
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig

    cohort, _ = cohort_and_cache(tmp_path, 4)
    cases = find_cases(cohort).cases
    cases[0] = cases[0].__class__("site:A: case 1", cases[0].label, cases[0].paths)
    bad = tmp_path / "bad_t1.nii.gz"
    bad.write_bytes(b"not a scan")
    cases[0] = cases[0].__class__(cases[0].patient_id, cases[0].label, (bad, *cases[0].paths[1:]))
    out = tmp_path / "colon"
    result = prepare(cases, out, PreprocessConfig(size=TINY_SIZE), workers=1, progress=False, skip_bad=True)
    assert [line.startswith("site:A: case 1: cannot read t1") for line in result.failed] == [True]
    cached = open_cache(out)  # opens: no listed patient lacks its volume
    assert "site:A: case 1" not in cached.patient_ids and len(cached) == 3


def test_two_prepares_of_one_cache_at_once_are_refused(tmp_path):
    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig
    from brats.errors import BratsError
    from brats.io.processes import exclusive_lock

    cohort, cache = cohort_and_cache(tmp_path, 4)
    with exclusive_lock(cache, "cache", "wait"):  # as another prepare would hold it
        with pytest.raises(BratsError, match=f"cache {cache} is in use by process {os.getpid()}: wait for"):
            prepare(
                find_cases(cohort).cases, cache, PreprocessConfig(size=TINY_SIZE), workers=1, progress=False
            )
    prepare(find_cases(cohort).cases, cache, PreprocessConfig(size=TINY_SIZE), workers=1, progress=False)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no lock file left behind


def test_prepare_at_another_size_into_an_existing_cache_is_refused_unless_replace(tmp_path):
    import subprocess
    import sys

    cohort, cache = cohort_and_cache(tmp_path, 4)
    before = {p: digest(p) for p in cache.rglob("*") if p.is_file()}
    cmd = [
        sys.executable,
        "-m",
        "brats.prepare",
        str(cohort),
        "--out",
        str(cache),
        "--size",
        "32",
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "size 24 -> 32" in r.stderr and "--replace" in r.stderr, r.stderr
    assert {p: digest(p) for p in cache.rglob("*") if p.is_file()} == before
    r = subprocess.run([*cmd, "--replace"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- 3. every modality on the same grid, really


@pytest.fixture
def one_case(tmp_path):
    from brats.data.cohort import find_cases

    make_cohort(tmp_path / "c", 2, seed=8, shape=TINY_SHAPE, workers=1)
    return find_cases(tmp_path / "c").cases[0]


def edit_header(path: Path, change) -> None:
    """Change fields of a .nii.gz header in place, bytes as they are (nibabel's save would
    rewrite the sform and qform from the image's affine)."""
    import gzip

    import nibabel as nib

    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header(raw[:348], check=False)
    change(header)
    path.write_bytes(gzip.compress(header.binaryblock + raw[348:]))


def preprocess_error(case) -> str:
    from brats.data.preprocess import PreprocessConfig, preprocess_case
    from brats.errors import CaseError

    with pytest.raises(CaseError) as e:
        preprocess_case(case, PreprocessConfig(size=24))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_modality_shifted_40_mm_is_refused(one_case):
    def shift(h):
        h["qoffset_x"] += 40.0
        h["srow_x"][3] += 40.0

    edit_header(one_case.path("flair"), shift)
    err = preprocess_error(one_case)
    assert err.startswith(
        f"{one_case.patient_id}: flair file {one_case.path('flair')} has its origin 40 mm away"
    )


@pytest.mark.parametrize("spacing", [float("nan"), 0.0])
def test_a_spacing_that_is_not_a_positive_number_is_refused(one_case, spacing):
    def bad(h):
        h["pixdim"][3] = spacing

    edit_header(one_case.path("t2"), bad)
    err = preprocess_error(one_case)
    assert (
        f"cannot read t2 file {one_case.path('t2')}: its header's voxel spacing" in err
        and "not positive" in err
    )


def test_nan_in_the_t1_sform_is_blamed_on_the_t1(one_case):
    def nan(h):
        h["srow_y"][1] = float("nan")

    edit_header(one_case.path("t1"), nan)
    err = preprocess_error(one_case)
    assert f"cannot read t1 file {one_case.path('t1')}: its header's sform holds NaN" in err
    assert "t1ce" not in err


def test_a_constant_modality_is_refused(one_case):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(one_case.path("t1ce")))
    flat = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(img).shape, 500, np.int16))
    flat.CopyInformation(img)
    sitk.WriteImage(flat, str(one_case.path("t1ce")))
    err = preprocess_error(one_case)
    assert f"t1ce file {one_case.path('t1ce')}: every voxel holds the same value (500)" in err


# --- 4. score the model you think you score


def test_a_checkpoint_copied_from_another_fold_is_refused(exported, tmp_path, capsys):
    run = copy_run(exported[0], tmp_path / "run")
    (run / "fold_1" / "best_ema.pt").unlink()
    shutil.copy(run / "fold_0" / "best_ema.pt", run / "fold_1" / "best_ema.pt")
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", run, "--folds", "1"))
    assert "holds fold 0's model, not fold 1's" in err
    err = one_line_error(
        run_cli(capsys, "export.py", "--run", run, "--fold", "1", "--out", tmp_path / "m.onnx")
    )
    assert "holds fold 0's model, not fold 1's" in err and not (tmp_path / "m.onnx").exists()


def test_swapped_folds_in_splits_json_are_refused(exported, tmp_path, capsys):
    import json

    run = copy_run(exported[0], tmp_path / "run")
    splits = json.loads((run / "splits.json").read_text())
    folds = splits["folds"]
    folds[0]["val"], folds[1]["val"] = folds[1]["val"], folds[0]["val"]
    (run / "splits.json").write_text(json.dumps(splits))
    err = one_line_error(run_cli(capsys, "evaluate.py", "--run", run, "--folds", "0"))
    assert "was trained on other patients than" in err and "splits.json gives fold 0" in err


@pytest.fixture(scope="module")
def stopped_run(cache20, tmp_path_factory):
    """Fold 0 of a 5-epoch run killed after its second epoch: (config, run folder); read-only."""
    from support import FAST, reset_accelerate

    import brats.training.engine as engine
    from brats.training.config import make_config

    run = tmp_path_factory.mktemp("stopped") / "run"
    cfg = make_config(data=str(cache20), run=str(run), max_epochs=5, ema_decay=0.9, **FAST)
    real = engine.run_epoch

    def killed_after_two(fold, state, epoch):
        if epoch == 3:
            raise KeyboardInterrupt  # as a kill would stop it
        real(fold, state, epoch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "run_epoch", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            engine.train_fold(cfg)
    reset_accelerate()
    return cfg, run


@pytest.fixture
def stopped_fold(stopped_run, tmp_path):
    """A copy of stopped_run to change: (config pointing at the copy, run folder)."""
    import dataclasses

    cfg, run = stopped_run
    copy = copy_run(run, tmp_path / "run")
    return dataclasses.replace(cfg, run=str(copy)), copy


def test_an_unfinished_fold_is_marked_and_not_exported_unless_asked(stopped_fold, tmp_path, capsys):
    from brats.evaluation.cross_validation import evaluate_run

    _, run = stopped_fold
    summary = evaluate_run(run, folds=[0])
    assert (summary.folds[0].finished, summary.folds[0].epochs_trained) == (False, 2)
    assert (
        "**Unfinished folds**: fold 0 (stopped after epoch 2)"
        in (run / "evaluation" / "report.md").read_text()
    )
    out = tmp_path / "m.onnx"
    err = one_line_error(run_cli(capsys, "export.py", "--run", run, "--fold", "0", "--out", out))
    assert "fold 0 after epoch 2 did not finish training" in err and "--allow-unfinished" in err
    assert not out.exists()
    r = run_cli(capsys, "export.py", "--run", run, "--fold", "0", "--out", out, "--allow-unfinished")
    assert r.code == 0 and out.is_file(), r.err


def test_resume_after_config_json_was_deleted_refuses_other_settings(stopped_fold, fresh_accelerate):
    import dataclasses

    from brats.errors import BratsError
    from brats.training.engine import train_fold

    cfg, run = stopped_fold
    (run / "config.json").unlink()
    with pytest.raises(BratsError, match=r"state.pt was written with other settings \(lr: 0.0001 -> 0.001\)"):
        train_fold(dataclasses.replace(cfg, lr=1e-3, resume=True))


def test_a_resumed_fold_refuses_a_cache_prepared_again_at_another_size(
    stopped_fold, cache20, tmp_path, fresh_accelerate
):
    import dataclasses

    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig
    from brats.errors import BratsError
    from brats.training.engine import train_fold

    cfg, run = stopped_fold
    cache = tmp_path / "cache32"
    shutil.copytree(cache20, cache)
    cases = find_cases(cache20.parent / "cohort").cases
    prepare(cases, cache, PreprocessConfig(size=TINY_SIZE + 8), progress=False, replace=True)
    with pytest.raises(
        BratsError, match="preprocess.json: the run's folds trained on a cache preprocessed otherwise"
    ):
        train_fold(dataclasses.replace(cfg, data=str(cache), resume=True))


@pytest.mark.parametrize("damage", ["no model", "no optimizer", "epoch abc", "a list", "a string"])
def test_a_resume_state_missing_or_damaging_what_exact_resume_needs_is_refused(
    stopped_fold, damage, fresh_accelerate
):
    import dataclasses

    import torch

    from brats.errors import BratsError
    from brats.training.engine import train_fold

    cfg, run = stopped_fold
    path = run / "fold_0" / "state.pt"
    state = torch.load(path, weights_only=True)
    if damage == "no model":
        del state["model_state_dict"]
    elif damage == "no optimizer":
        del state["optimizer"]
    elif damage == "epoch abc":
        state["fold_state"]["epoch"] = "abc"
    path.unlink()
    torch.save(["x"] if damage == "a list" else "x" if damage == "a string" else state, path)
    with pytest.raises(BratsError) as e:
        train_fold(dataclasses.replace(cfg, resume=True))
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg and "delete it to start the fold over" in msg


def test_a_decision_that_grades_everyone_alike_is_refused():
    from brats.deploy.contract import Decision
    from brats.errors import BratsError

    good = {"calibration": "platt", "slope": 1.2, "intercept": 0.3, "threshold": 0.4, "rule": "youden"}
    assert Decision.from_dict(good, "m.onnx").threshold == 0.4
    for bad in (
        {**good, "threshold": 0.0},
        {**good, "threshold": 1.0},
        {**good, "slope": 0.0},
        {**good, "rule": "0.5", "threshold": 0.99},
        {**good, "calibration": "none"},
        {**good, "calibration": "temperature"},
    ):
        with pytest.raises(BratsError, match="^m.onnx: its decision is not one evaluate.py fits"):
            Decision.from_dict(bad, "m.onnx")


def test_a_model_whose_contract_grades_everyone_hgg_is_refused_by_predict(exported, tmp_path, capsys):
    import json

    import onnx

    model = onnx.load(str(exported[1]))
    for entry in model.metadata_props:
        if entry.key == "brats_contract":
            contract = json.loads(entry.value)
            contract["decision"]["threshold"] = 0.0
            entry.value = json.dumps(contract)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    err = one_line_error(
        run_cli(capsys, "predict.py", bad, new_patients(tmp_path), "--out", tmp_path / "p.csv")
    )
    assert "threshold 0.0, not strictly between 0 and 1" in err


def write_manifest(tmp_path: Path, rows: list[tuple[str, Path]]) -> Path:
    lines = ["patient_id,label,t1,t1ce,t2,flair"]
    for pid, case in rows:
        files = [str(next(case.glob(f"*_{m}.nii.gz"))) for m in ("t1", "t1ce", "t2", "flair")]
        lines.append(f"{pid},HGG,{','.join(files)}")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_manifest_giving_one_patients_files_under_several_ids_is_refused(tmp_path):
    from brats.data.cohort import find_cases

    make_cohort(tmp_path / "c", 3, seed=6, shape=TINY_SHAPE, workers=1)
    cases = sorted(
        p for g in ("HGG", "LGG") if (tmp_path / "c" / g).is_dir() for p in (tmp_path / "c" / g).iterdir()
    )
    rows = [("A", cases[0]), ("B", cases[0]), ("C", cases[1]), *[(f"S{i}", cases[2]) for i in range(6)]]
    cohort = find_cases(write_manifest(tmp_path, rows))
    assert [c.patient_id for c in cohort.cases] == ["C"]
    refused = {e.patient_id: e.reason for e in cohort.problems}
    assert sorted(refused) == ["A", "B", *[f"S{i}" for i in range(6)]]
    assert "A (line 2 of" in refused["B"] and "B (line 3 of" in refused["A"]


def test_a_manifest_row_without_an_id_is_refused(tmp_path):
    from brats.data.cohort import find_cases

    make_cohort(tmp_path / "c", 2, seed=6, shape=TINY_SHAPE, workers=1)
    case = first_case(tmp_path / "c")
    cohort = find_cases(write_manifest(tmp_path, [(" ", case)]))
    assert (
        cohort.cases == []
        and "line 2" in cohort.problems[0].reason
        and "empty patient_id" in cohort.problems[0].reason
    )


def test_two_different_patients_under_one_id_are_not_graded_in_one_predict(model_copy, tmp_path, capsys):
    a, b = new_patients(tmp_path / "a", 2), new_patients(tmp_path / "b", 2)
    case_a = first_case(a)
    other = sorted(p for g in ("HGG", "LGG") if (b / g).is_dir() for p in (b / g).iterdir())[1]
    renamed = other.parent / case_a.name
    other.rename(renamed)
    for f in renamed.iterdir():
        f.rename(f.with_name(f.name.replace(other.name, case_a.name)))
    out = tmp_path / "p.csv"
    r = run_cli(capsys, "predict.py", model_copy, case_a, renamed, "--out", out)
    assert r.code == 1
    assert f"{case_a.name}: two different patients carry this id ({case_a} and {renamed})" in r.err
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [row[1] for row in rows if row[0] == case_a.name] == [""]  # one row, not graded


# --- 5. processes die with their parent; a fold has one writer


def test_kill_9_of_the_fold_scheduler_takes_its_launchers_and_trainings_down(cache20, tmp_path):
    """brats.cv -> accelerate launch -> train.py, twice: kill -9 of the scheduler leaves none."""
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    args = ["--depth", "10", "--max-epochs", "200", "--min-epochs", "200", "--workers", "0", "--no-progress"]
    cmd = [sys.executable, "-m", "brats.cv", "--gpus", "cpu,cpu", "--folds", "0,1", "--data", str(cache20)]
    proc = subprocess.Popen([*cmd, "--run", str(run), "--", *args], stderr=subprocess.DEVNULL)
    try:
        assert eventually(lambda: all((run / f"fold_{k}" / "metrics.csv").is_file() for k in (0, 1)), 120), (
            "both folds never started"
        )
        family = descendants(proc.pid)
        trainings = [p for p in family if b"train.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(trainings) >= 2, family
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert eventually(lambda: not any(alive(p) for p in family), 20), "a launcher or training outlived it"
    finally:  # whatever outlived the test must not outlive the suite
        for p in [proc.pid, *family, *descendants(proc.pid)]:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_fold_being_trained_is_not_trained_a_second_time(cache20, tmp_path, fresh_accelerate):
    from support import FAST

    from brats.errors import BratsError
    from brats.io.processes import exclusive_lock
    from brats.training.config import make_config
    from brats.training.engine import train_fold

    cfg = make_config(data=str(cache20), run=str(tmp_path / "run"), max_epochs=1, resume=True, **FAST)
    folder = tmp_path / "run" / "fold_0"
    folder.mkdir(parents=True)
    with exclusive_lock(folder, "fold", "-"):  # as the training still running would hold it
        with pytest.raises(
            BratsError, match=f"fold 0 of {tmp_path / 'run'} is in use by process {os.getpid()}"
        ):
            train_fold(cfg)
    assert not (folder / "state.pt").exists()
    train_fold(cfg)  # the lock is gone with its holder
    assert (folder / "state.pt").exists()


# --- 6. one line, never a traceback


def test_an_unreadable_patient_folder_is_one_line_and_the_others_are_found(tmp_path, monkeypatch):
    from brats.data.cohort import find_cases

    make_cohort(tmp_path / "c", 4, seed=6, shape=TINY_SHAPE, workers=1)
    locked = first_case(tmp_path / "c")
    real = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    cohort = find_cases(tmp_path / "c")
    assert len(cohort.cases) == 3
    [problem] = cohort.problems
    assert str(problem) == f"{locked.name}: cannot list {locked} (Permission denied): check its permissions"


@pytest.mark.parametrize(
    "content",
    ["a list", "a string", "weights a string", "epoch abc", "wrong shape", "auc 5", "random bytes"],
)
def test_a_damaged_checkpoint_is_one_line_and_never_advises_unpickling(exported, tmp_path, capsys, content):
    import torch

    run = copy_run(exported[0], tmp_path / "run")
    path = run / "fold_1" / "best_ema.pt"
    ckpt = torch.load(path, weights_only=True)
    path.unlink()
    if content == "random bytes":
        path.write_bytes(os.urandom(4096))
    else:
        if content == "weights a string":
            ckpt["model_state_dict"] = "x"
        elif content == "epoch abc":
            ckpt["epoch"] = "abc"
        elif content == "wrong shape":
            ckpt["model_state_dict"]["fc.weight"] = torch.zeros(3, 3)
        elif content == "auc 5":
            ckpt["val_metrics"]["auc"] = 5.0
        torch.save(["x"] if content == "a list" else "x" if content == "a string" else ckpt, path)
    for trust in ([], ["--trust-checkpoints"]):
        err = one_line_error(run_cli(capsys, "evaluate.py", "--run", run, "--folds", "1", *trust))
        assert str(path) in err and "--trust-checkpoints" not in err, err


def test_a_full_disk_under_torch_save_is_one_line(cache20, tmp_path, monkeypatch, fresh_accelerate):
    from collections import namedtuple

    import torch
    from support import FAST

    from brats.errors import BratsError
    from brats.training.config import make_config
    from brats.training.engine import train_fold

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(10, 10, 0))
    with pytest.raises(BratsError) as e:
        train_fold(make_config(data=str(cache20), run=str(tmp_path / "run"), max_epochs=1, **FAST))
    assert "the disk is full" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "run" / "fold_0").glob(".tmp-*"))


def test_a_full_disk_during_prepare_says_so_even_without_an_errno(tmp_path, monkeypatch):
    from collections import namedtuple

    from support import TINY_SIZE

    from brats.data.cache_builder import prepare
    from brats.data.cohort import find_cases
    from brats.data.preprocess import PreprocessConfig
    from brats.errors import BratsError

    make_cohort(tmp_path / "c", 2, seed=6, shape=TINY_SHAPE, workers=1)

    def short_write(*args, **kwargs):
        raise OSError("1000000 requested and 10224 written")  # numpy's tofile on a full disk

    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(10, 10, 0))
    with pytest.raises(BratsError, match="the disk is full: free some space"):
        prepare(
            find_cases(tmp_path / "c").cases, tmp_path / "cache", PreprocessConfig(size=TINY_SIZE), workers=1
        )


def test_nan_in_a_cached_volume_is_one_line_even_under_a_matching_checksum(
    cache20, tmp_path, fresh_accelerate
):
    import json

    from support import FAST

    from brats.errors import BratsError
    from brats.io.compression import checksum
    from brats.training.config import make_config
    from brats.training.engine import train_fold

    cache = tmp_path / "cache"
    shutil.copytree(cache20, cache)
    index = json.loads((cache / "index.json").read_text())
    entry = index["patients"][0]
    volume = np.load(cache / entry["file"])
    volume[0, 5, 5, 5] = np.nan
    np.save(cache / entry["file"], volume)
    entry["crc32"] = checksum(memoryview(np.ascontiguousarray(volume)).cast("B"))
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(BratsError) as e:
        train_fold(make_config(data=str(cache), run=str(tmp_path / "run"), max_epochs=1, **FAST))
    assert str(e.value).startswith(f"{entry['patient_id']}: cached volume") and "NaN" in str(e.value)


def test_an_unknown_grade_for_every_lgg_is_named_not_hidden_behind_one_class_only(tmp_path):
    import csv
    import subprocess
    import sys

    from support import make_brats20

    make_cohort(tmp_path / "c18", 6, seed=6, shape=TINY_SHAPE, workers=1)
    root = make_brats20(tmp_path / "c18", tmp_path / "c20")
    rows = list(csv.DictReader(open(root / "name_mapping.csv")))
    for row in rows:
        if row["Grade"] == "LGG":
            row["Grade"] = "GBM"
    with open(root / "name_mapping.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    r = subprocess.run(
        [sys.executable, "-m", "brats.prepare", str(root), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    line = r.stderr.strip()
    assert r.returncode == 1 and "Traceback" not in r.stderr and "\n" not in line
    assert "one class only" in line and "could not be used" in line and "unknown grade 'GBM'" in line


# --- found by a sweep of bad inputs (bench/RESULTS.md): each was a lost file or a traceback


def test_a_cam_file_name_never_replaces_an_input(model_copy, tmp_path, capsys):
    new = new_patients(tmp_path)
    case = first_case(new)
    cams = tmp_path / "cams"
    cams.mkdir()
    trap = cams / f"{case.name}_cam.nii.gz"
    shutil.copy(model_copy, trap)  # the model kept where a map would go
    before = digest(trap)
    err = one_line_error(run_cli(capsys, "predict.py", trap, new, "--out", tmp_path / "p.csv", "--cam", cams))
    assert f"{case.name}'s map" in err and digest(trap) == before


def test_predict_out_never_replaces_a_manifest_or_an_evaluation(model_copy, tmp_path, capsys):
    new = new_patients(tmp_path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,label,t1,t1ce,t2,flair\nX,HGG,a,b,c,d\n")
    evaluation = tmp_path / "predictions.csv"
    evaluation.write_text("patient_id,fold,label,p_hgg\nX,0,1,0.7\n")
    for csv_file in (manifest, evaluation):
        before = csv_file.read_text()
        assert "is not a predictions CSV" in one_line_error(
            run_cli(capsys, "predict.py", model_copy, new, "--out", csv_file)
        )
        assert csv_file.read_text() == before


def test_prepare_never_replaces_a_json_that_is_not_a_cache_index(tmp_path, capsys):
    import subprocess
    import sys

    make_cohort(tmp_path / "c", 4, seed=6, shape=TINY_SHAPE, workers=1)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "index.json").write_text('{"my": "notes"}')
    r = subprocess.run(
        [sys.executable, "-m", "brats.prepare", str(tmp_path / "c"), "--out", str(out), "--size", "24"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "it is not a cache" in r.stderr
    assert (out / "index.json").read_text() == '{"my": "notes"}'


def test_a_refused_resume_leaves_config_json_as_it_was(stopped_fold, fresh_accelerate):
    import dataclasses
    import json

    from brats.errors import BratsError
    from brats.training.engine import train_fold

    cfg, run = stopped_fold
    (run / "config.json").unlink()
    with pytest.raises(BratsError, match="written with other settings"):
        train_fold(dataclasses.replace(cfg, lr=1e-3, resume=True))
    assert not (run / "config.json").exists() or json.loads((run / "config.json").read_text())["lr"] == cfg.lr


@pytest.mark.parametrize(
    "option", [("--seed", "-1"), ("--split-seed", str(2**32)), ("--weight-decay", "inf")]
)
def test_settings_out_of_range_are_one_line(cache20, tmp_path, capsys, option):
    err = one_line_error(run_cli(capsys, "train.py", "--data", cache20, "--run", tmp_path / "r", *option))
    assert option[0] in err
