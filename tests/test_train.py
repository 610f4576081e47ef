"""End-to-end training: real entry points, tiny cubes, depth 10."""

import csv
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import FAST, reset_accelerate

from brats.errors import BratsError
from brats.runs.keeper import AUC_EPS
from brats.runs.paths import BEST, BEST_EMA, STATE
from brats.training.config import make_config
from brats.training.engine import TrainingError, train_fold

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TIMING = ("seconds", "train_samples_per_s")  # metrics.csv columns that measure the machine
CLI_FAST = ["--depth", "10", "--workers", "0", "--no-progress", "--min-epochs", "1", "--warmup-epochs", "1"]


def free_port() -> int:
    """A port for the gloo rendezvous, so that back-to-back launches never collide on 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multi_process(n: int) -> list[str]:
    return [*ACCELERATE, "--multi_gpu", "--num_processes", str(n), "--main_process_port", str(free_port())]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_accelerate_launch_writes_every_file(cache20, tmp_path):
    run = tmp_path / "run"
    cmd = [
        *ACCELERATE,
        "--config_file",
        str(ROOT / "accelerate_config.yaml"),
        str(ROOT / "train.py"),
        "--fold",
        "0",
        "--data",
        str(cache20),
        "--run",
        str(run),
        "--max-epochs",
        "3",
        *CLI_FAST,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mixed precision bf16 requested but training on the CPU: using fp32" in r.stderr
    fold = run / "fold_0"
    for name in (BEST, STATE, "metrics.csv"):
        assert (fold / name).is_file()
    assert {p.name.split("_epoch_")[0] for p in fold.glob("*_epoch_*.png")} == {
        "roc_curve",
        "pr_curve",
        "confusion_matrix",
    }
    assert len(rows(fold / "metrics.csv")) == 3
    assert set(rows(fold / "metrics.csv")[0]) >= {
        "epoch",
        "train_loss",
        "val_loss",
        "val_auc",
        "val_f1",
        "val_macro_f1",
        "val_accuracy",
        "val_balanced_accuracy",
        "val_precision",
        "val_recall",
        "lr",
    }
    ckpt = torch.load(fold / BEST, weights_only=True)  # plain contents only
    assert {
        "model_state_dict",
        "epoch",
        "val_metrics",
        "config",
        "fold",
        "splits_fingerprint",
        "is_ema",
    } <= set(ckpt)
    assert ckpt["is_ema"] is False and ckpt["fold"] == 0 and isinstance(ckpt["config"], dict)
    history = rows(fold / "metrics.csv")
    seen = [(float(r["val_auc"]), -float(r["val_loss"]), -int(r["epoch"])) for r in history]
    auc, _, epoch = max(seen)  # the best AUC; among equal ones the lowest val loss, then the first
    assert ckpt["epoch"] == -epoch and ckpt["val_metrics"]["auc"] == auc
    splits = json.loads((run / "splits.json").read_text())
    assert ckpt["splits_fingerprint"] == splits["cohort_fingerprint"]
    assert json.loads((run / "config.json").read_text())["depth"] == 10
    assert not [p for p in fold.iterdir() if p.name.startswith(".tmp-")]


def test_baseline_policy_and_ema(cache20, tmp_path, fresh_accelerate):
    cfg = make_config(
        "baseline", data=str(cache20), run=str(tmp_path / "b"), fold=1, max_epochs=2, ema_decay=0.995, **FAST
    )
    summary = train_fold(cfg)
    fold = tmp_path / "b" / "fold_1"
    assert (fold / BEST_EMA).is_file() and (fold / BEST).is_file()
    ema = torch.load(fold / BEST_EMA, weights_only=True)
    assert ema["is_ema"] is True and ema["epoch"] == summary["best_ema_epoch"]
    assert ema["model_state_dict"]["conv1.weight"].shape[1] == 1  # FLAIR only
    assert ema["config"]["loss"] == "ldam"
    assert "ema_val_auc" in rows(fold / "metrics.csv")[0]
    assert list(fold.glob("ema_roc_curve_epoch_*.png"))
    assert not list(fold.glob("roc_curve_epoch_*.png"))  # plots of the checkpoint evaluation uses only


def test_state_every_writes_on_a_new_best_and_at_the_end(cache20, tmp_path, fresh_accelerate, monkeypatch):
    import brats.training.engine

    written, save = [], brats.training.engine.save_resume_state

    def spy(path, objects, extra):
        written.append(objects["fold_state"].epoch)
        save(path, objects, extra)

    monkeypatch.setattr(brats.training.engine, "save_resume_state", spy)
    run = str(tmp_path / "r")
    cfg = make_config(data=str(cache20), run=run, max_epochs=4, patience=10, state_every=3600, **FAST)
    train_fold(cfg)
    bests, top = [], (-1.0, float("inf"))  # epochs of a higher val AUC, or the same at a lower val loss
    for epoch, row in enumerate(rows(tmp_path / "r" / "fold_0" / "metrics.csv"), 1):
        auc, loss = float(row["val_auc"]), float(row["val_loss"])
        if auc > top[0] + AUC_EPS or (abs(auc - top[0]) <= AUC_EPS and loss < top[1]):
            bests, top = [*bests, epoch], (auc, loss)
    assert written == sorted({*bests, 4})
    ended = torch.load(tmp_path / "r" / "fold_0" / STATE, weights_only=True)
    assert ended["fold_state"]["finished"] and ended["fold_state"]["epoch"] == 4
    # a finished fold trains no further: its state holds no weights (they are in the checkpoints)
    assert not {"model_state_dict", "ema_state_dict", "optimizer"} & set(ended)
    assert ended["best"]["best_epoch"] == bests[-1]

    written.clear()
    train_fold(dataclasses.replace(cfg, run=str(tmp_path / "every"), state_every=0.0))
    assert written == [1, 2, 3, 4]


def test_select_last_keeps_each_folds_last_epoch_and_the_report_is_not_optimistic(
    cache20, tmp_path, fresh_accelerate, monkeypatch
):
    import brats.training.engine
    from brats.evaluation.cross_validation import evaluate_run

    written, save = [], brats.training.engine.save_resume_state

    def spy(path, objects, extra):
        written.append(objects["fold_state"].epoch)
        save(path, objects, extra)

    monkeypatch.setattr(brats.training.engine, "save_resume_state", spy)
    run = tmp_path / "r"
    cfg = make_config(
        data=str(cache20), run=str(run), max_epochs=3, patience=1, ema_decay=0.9, select="last", **FAST
    )
    summary = train_fold(cfg)
    assert summary["epochs"] == 3  # patience 1 stops nothing: no epoch is judged on validation
    assert written == [1, 2, 3]  # --state-every 0: checkpoints and state every epoch
    for name in (BEST, BEST_EMA):
        assert torch.load(run / "fold_0" / name, weights_only=True)["epoch"] == 3
    report = evaluate_run(run, folds=[0])
    assert report.optimistic is False and report.protocol.startswith("last epoch of each fold")
    assert "optimistic" not in (run / "evaluation" / "report.md").read_text()

    written.clear()
    train_fold(dataclasses.replace(cfg, run=str(tmp_path / "spaced"), state_every=3600.0))
    assert written == [3]  # checkpoints go with the state: at the end only
    assert torch.load(tmp_path / "spaced" / "fold_0" / BEST, weights_only=True)["epoch"] == 3


def test_two_folds_of_one_run_must_share_settings(cache20, tmp_path, fresh_accelerate):
    run = str(tmp_path / "r")
    train_fold(make_config(data=str(cache20), run=run, fold=0, max_epochs=1, **FAST))
    with pytest.raises(BratsError, match="other settings .*lr"):
        train_fold(make_config(data=str(cache20), run=run, fold=1, max_epochs=1, lr=3e-4, **FAST))
    with pytest.raises(BratsError, match="already holds a trained fold: pass --resume"):
        train_fold(make_config(data=str(cache20), run=run, fold=0, max_epochs=1, **FAST))
    # a config.json written before a field existed still matches (the field takes its default)
    path = tmp_path / "r" / "config.json"
    old = json.loads(path.read_text())
    del old["warmup_fraction"]
    path.write_text(json.dumps(old))
    assert (
        train_fold(make_config(data=str(cache20), run=run, fold=0, max_epochs=1, resume=True, **FAST))[
            "epochs"
        ]
        == 1
    )


def test_nan_loss_stops_with_epoch_and_step_and_writes_nothing(cache20, tmp_path, fresh_accelerate):
    """An absurd learning rate makes the loss non-finite within the first epoch: training stops
    with a line naming the epoch and the step, and no checkpoint, state or temp file is left."""
    cfg = make_config(data=str(cache20), run=str(tmp_path / "n"), fold=0, max_epochs=3, lr=1e30, **FAST)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf|-inf) at epoch 1, step \d+: training stopped"):
        train_fold(cfg)
    fold = tmp_path / "n" / "fold_0"
    left = sorted(p.name for p in fold.iterdir()) if fold.exists() else []
    assert not [n for n in left if n in (BEST, STATE, "metrics.csv") or n.startswith(".tmp-")], left


def test_run_is_identified_by_its_settings_not_its_path(cache20, tmp_path, fresh_accelerate, monkeypatch):
    """The same run given as a relative and an absolute path, or copied elsewhere, is the same run."""
    monkeypatch.chdir(tmp_path)
    train_fold(make_config(data=str(cache20), run="r", fold=0, max_epochs=1, **FAST))
    reset_accelerate()
    train_fold(make_config(data=str(cache20), run=str(tmp_path / "r"), fold=1, max_epochs=1, **FAST))
    reset_accelerate()
    shutil.copytree(tmp_path / "r", tmp_path / "moved")
    resumed = train_fold(
        make_config(data=str(cache20), run=str(tmp_path / "moved"), fold=1, max_epochs=1, resume=True, **FAST)
    )
    assert resumed["epochs"] == 1 and resumed["stop_reason"].startswith("reached --max-epochs")
    reset_accelerate()
    with pytest.raises(BratsError, match="other settings .*lr"):  # settings still count
        train_fold(make_config(data=str(cache20), run="moved", fold=2, max_epochs=1, lr=3e-4, **FAST))


def test_stale_temps_are_removed_and_an_unwritable_run_gives_one_line(cache20, tmp_path, fresh_accelerate):
    fold = tmp_path / "r" / "fold_0"
    fold.mkdir(parents=True)
    dead_pid = 2**22 + 1  # above Linux's pid_max: no live process owns these
    stale = [fold / f".tmp-{dead_pid}-best.pt.part", tmp_path / "r" / f".tmp-{dead_pid}-config.json.part"]
    for p in stale:
        p.write_bytes(b"torn")
    train_fold(make_config(data=str(cache20), run=str(tmp_path / "r"), fold=0, max_epochs=1, **FAST))
    assert not [p for p in stale if p.exists()]
    reset_accelerate()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(BratsError, match="is a file, not a folder"):
        train_fold(make_config(data=str(cache20), run=str(blocker), fold=0, max_epochs=1, **FAST))


def weights(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def test_sigkill_then_resume_equals_uninterrupted(cache20, tmp_path):
    """--select last: the checkpoints hold the last epoch's weights (the model and its EMA), so
    the resumed run must end with exactly the uninterrupted run's final weights."""
    args = [
        "--data",
        str(cache20),
        "--fold",
        "2",
        "--max-epochs",
        "6",
        "--select",
        "last",
        "--ema-decay",
        "0.9",
        *CLI_FAST,
    ]
    ref = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--run", str(tmp_path / "ref"), *args],
        capture_output=True,
        text=True,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    metrics = run / "fold_2" / "metrics.csv"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--run", str(run), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Killed as soon as epoch 2 is logged: its state is written, epoch 3 has begun.
    for line in proc.stderr:
        if "epoch 2/6 " in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = len(rows(metrics))
    assert 2 <= done < 6, "the kill must land part-way"
    resumed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--run", str(run), "--resume", *args],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run / 'fold_2' / STATE} after epoch" in resumed.stderr

    a, b = tmp_path / "ref" / "fold_2", run / "fold_2"
    assert rows(a / "metrics.csv") == [
        {**r, **{k: x[k] for k in TIMING}} for r, x in zip(rows(b / "metrics.csv"), rows(a / "metrics.csv"))
    ]
    for name in (BEST, BEST_EMA):
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = (torch.load(f / STATE, weights_only=True) for f in (a, b))
    assert sa["fold_state"]["finished"] and (sa["best"], sa["best_ema"]) == (sb["best"], sb["best_ema"])
    ca, cb = torch.load(a / BEST, weights_only=True), torch.load(b / BEST, weights_only=True)
    assert ca["epoch"] == cb["epoch"] == 6 and ca["val_metrics"]["auc"] == cb["val_metrics"]["auc"]


def test_two_processes_score_like_one(cache20, tmp_path):
    helper = str(ROOT / "tests" / "helpers" / "ddp_scores.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run(
        [sys.executable, helper, str(cache20), str(tmp_path / "one.json")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            *multi_process(2),
            helper,
            str(cache20),
            str(tmp_path / "two.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["n"] == b["n"] == 5  # 5 patients over 2 processes: the padded duplicate is dropped
    assert sorted(a["labels"]) == sorted(b["labels"])
    for k in ("auc", "f1", "accuracy", "loss"):
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], abs=1e-6), k


def test_raw_cohort_is_prepared_first(cache20, tmp_path, fresh_accelerate):
    import shutil

    raw = tmp_path / "MICCAI_BraTS_2018_Data_Training"
    shutil.copytree(cache20.parent / "cohort", raw)
    cfg = make_config(data=str(raw), run=str(tmp_path / "r"), fold=0, max_epochs=1, size=24, **FAST)
    train_fold(cfg)
    cache = tmp_path / "MICCAI_BraTS_2018_Data_Training_cache24"
    assert (cache / "index.json").is_file()
    assert torch.load(tmp_path / "r" / "fold_0" / BEST, weights_only=True)["preprocess"]["size"] == 24


def test_two_gloo_processes_train_a_fold_compiled_with_one_ema_model(cache20, tmp_path):
    """`--multi_gpu --num_processes 2` with --cpu starts two gloo processes (`--cpu
    --num_processes 2` would silently start one), and both end cleanly. With --compile the model
    is compiled around DDP and the checkpoints hold the plain module's keys (a resume or export
    without --compile reads them); with EMA every process validates the main process's EMA
    model, so that best_ema.pt re-scores patient by patient as it was scored."""
    from brats.evaluation.cross_validation import evaluate_run

    run = tmp_path / "ddp"
    cmd = [*multi_process(2), str(ROOT / "train.py"), "--cpu", "--fold", "1", "--data", str(cache20)]
    cmd += ["--run", str(run), "--max-epochs", "2", "--ema-decay", "0.9", "--val-batch-size", "2", *CLI_FAST]
    r = subprocess.run(
        [*cmd, "--compile", "--compile-backend", "aot_eager"], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) on cpu" in r.stderr and "torch.compile (aot_eager)" in r.stderr
    assert len(rows(run / "fold_1" / "metrics.csv")) == 2
    for name in (BEST, BEST_EMA, STATE):
        saved = torch.load(run / "fold_1" / name, weights_only=True)
        weights = saved["model_state_dict"] if name != STATE else {}
        assert not [k for k in weights if k.startswith(("_orig_mod.", "module."))], name
    assert (
        torch.load(run / "fold_1" / BEST, weights_only=True)["val_metrics"]["n"] == 4
    )  # each val patient once
    row = evaluate_run(run, folds=[1]).folds[0]
    assert row.is_ema and row.patients_compared == 4 and row.max_abs_dp <= 1e-5, row


def test_a_state_written_by_older_code_still_resumes(cache20, tmp_path, fresh_accelerate, monkeypatch):
    """state.pt as older versions wrote it (bests inside fold_state, rng_cpu/rng_cuda, no keepers),
    after epoch 1 of 2: resumed, epoch 2 trains exactly as in the uninterrupted run."""
    import brats.training.engine

    after_epoch_1, save = [], brats.training.engine.save_resume_state

    def keep_first(path, objects, extra):
        save(path, objects, extra)
        if not after_epoch_1:
            after_epoch_1.append(torch.load(path, weights_only=True))

    monkeypatch.setattr(brats.training.engine, "save_resume_state", keep_first)
    settings = dict(data=str(cache20), run=str(tmp_path / "r"), fold=0, max_epochs=2, ema_decay=0.9, **FAST)
    first = train_fold(make_config(**settings))
    reset_accelerate()
    path = tmp_path / "r" / "fold_0" / STATE
    blob = after_epoch_1[0]
    assert blob["fold_state"]["epoch"] == 1 and "model_state_dict" in blob and "optimizer" in blob
    best, best_ema, rng = blob.pop("best"), blob.pop("best_ema"), blob.pop("rng")
    blob["fold_state"].update(
        best_auc=best["best_auc"],
        best_epoch=best["best_epoch"],
        best_ema_auc=best_ema["best_auc"],
        best_ema_epoch=best_ema["best_epoch"],
    )
    blob.update(rng_cpu=rng["cpu"], rng_cuda=rng["cuda"], scaler=None)
    torch.save(blob, path)
    metrics = tmp_path / "r" / "fold_0" / "metrics.csv"
    uninterrupted = [{k: v for k, v in r.items() if k not in TIMING} for r in rows(metrics)]
    again = train_fold(make_config(**settings, resume=True))
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows(metrics)] == uninterrupted
    # The same bests; an older state has no validation loss, so an AUC tie keeps its earlier
    # epoch, as the code that wrote it did (uninterrupted, the tie goes to the lower loss).
    assert (again["epochs"], again["best_auc"], again["best_ema_auc"]) == (
        2,
        first["best_auc"],
        first["best_ema_auc"],
    )


def test_resident_and_dataloader_paths_give_the_same_metrics(cache20, tmp_path, fresh_accelerate):
    """The default resident data path draws the same batches as --cache-device off (DataLoader
    with a worker process): on the CPU every metric but the timings is equal."""
    runs = {}
    for mode, workers in (("auto", 0), ("off", 1)):
        run = tmp_path / mode
        overrides = {**FAST, "workers": workers}
        train_fold(
            make_config(
                data=str(cache20), run=str(run), fold=1, max_epochs=2, ema_decay=0.9, cache_device=mode,
                **overrides,
            )
        )  # fmt: skip
        reset_accelerate()
        runs[mode] = [
            {k: v for k, v in r.items() if k not in TIMING} for r in rows(run / "fold_1" / "metrics.csv")
        ]
    assert len(runs["auto"]) == 2 and runs["auto"] == runs["off"]
    first = rows(tmp_path / "auto" / "fold_1" / "metrics.csv")[0]
    assert float(first["train_samples_per_s"]) > 0


def test_pretrained_medicalnet_offline_cached_and_missing(cache20, tmp_path):
    """--pretrained medicalnet with no network: from the Hugging Face cache when the weights are
    there (trained in the medicalnet layout), else one line with the manual route, before any data
    is read; launched as make cv launches it (accelerate launch --quiet), that line is the last,
    without the launcher's traceback."""
    from test_model import hub_cache

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    args = ["--data", str(cache20), "--fold", "0", "--depth", "10", "--max-epochs", "1"]
    args += ["--min-epochs", "1", "--workers", "0", "--no-progress", "--pretrained", "medicalnet"]
    launch = [
        *ACCELERATE,
        "--quiet",
        "--config_file",
        str(ROOT / "accelerate_config.yaml"),
        "--num_processes",
        "1",
    ]
    r = subprocess.run(
        [*launch, str(ROOT / "train.py"), "--run", str(tmp_path / "a"), "--cpu", *args],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0] == r.stderr.strip().splitlines()[-1]
    assert "(HF_HUB_OFFLINE is set): download it on a connected machine" in error[0]
    assert "--pretrained PATH/resnet_10_23dataset.pth" in error[0] and "fold 0:" not in r.stderr
    assert not (tmp_path / "a" / "fold_0").exists()

    hub_cache(tmp_path / "hub", 10)
    env["HF_HUB_CACHE"] = str(tmp_path / "hub")
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--run", str(tmp_path / "b"), *args],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded " in r.stderr and "backbone tensors from" in r.stderr
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["pretrained"] == "medicalnet" and cfg["layout"] == "medicalnet"


def test_resnet50_from_scratch_says_the_recipe_starts_from_medicalnet(cache20, tmp_path, caplog):
    from support import FAST, reset_accelerate

    from brats.training.config import make_config
    from brats.training.engine import train_fold

    caplog.set_level(logging.INFO)
    settings = {**FAST, "depth": 50, "max_epochs": 1, "folds": 5}
    train_fold(make_config(data=str(cache20), run=str(tmp_path / "r50"), fold=0, **settings))
    reset_accelerate()
    said = [
        r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if "from scratch:" in r.getMessage()
    ]
    assert said == [
        "ResNet-50 from scratch: the recipe starts from MedicalNet weights (RECIPE.md 1.4) "
        "(--pretrained medicalnet, or --pretrained PATH/resnet_50_23dataset.pth)"
    ]
