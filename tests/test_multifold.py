"""Several folds in one process (`train.py --fold 0,1` / `--fold all`): each fold trains exactly
as it would alone, a rerun skips finished folds and resumes a killed one."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import FAST, reset_accelerate

from brats.runs.paths import BEST, BEST_EMA, STATE
from brats.training.config import make_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "accelerate_config.yaml"
TIMING = ("seconds", "train_samples_per_s")  # metrics.csv columns that measure the machine
# grad-accum 2 and batch 3: 16 training patients make 5 micro-batches, so an epoch ends half-way
# through an accumulation; EMA and dropout on, so that every random stream and every piece of
# Accelerate state a fold could inherit from the one before shows in its numbers.
SETTINGS = dict(FAST, max_epochs=2, patience=10, ema_decay=0.9, grad_accum=2, batch_size=3)
CLI = (
    "--depth 10 --workers 0 --no-progress --min-epochs 1 --warmup-epochs 1 "
    "--max-epochs 2 --patience 10 --ema-decay 0.9 --grad-accum 2 --batch-size 3"
).split()


def rows(path: Path) -> list[dict]:
    """metrics.csv without the columns that time the machine."""
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state_dict"]


def same_fold(a: Path, b: Path) -> None:
    """Fold folders `a` and `b` hold the same training: metrics, every checkpoint's weights and the
    bests their finished states record."""
    assert rows(a / "metrics.csv") == rows(b / "metrics.csv")
    for name in (BEST, BEST_EMA):
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = (torch.load(f / STATE, weights_only=True) for f in (a, b))
    assert (sa["best"], sa["best_ema"]) == (sb["best"], sb["best_ema"])


@pytest.fixture(scope="module")
def two_folds(cache20, tmp_path_factory) -> Path:
    """Folds 0 then 1 of one run, trained in one call (in this process)."""
    from brats.training.engine import train_folds

    run = tmp_path_factory.mktemp("multi") / "run"
    cfgs = [make_config(data=str(cache20), run=str(run), fold=k, **SETTINGS) for k in (0, 1)]
    try:
        summaries = train_folds(cfgs)
    finally:
        reset_accelerate()
    assert [s["fold"] for s in summaries] == [0, 1]
    assert all(s["epochs"] == 2 for s in summaries)
    return run


def test_a_fold_after_another_trains_as_it_does_alone(two_folds, cache20, tmp_path):
    alone = tmp_path / "alone"  # one fold per process, as one launch per fold trains it
    cmd = [sys.executable, str(ROOT / "train.py"), "--fold", "1", "--data", str(cache20), "--run", str(alone)]
    r = subprocess.run([*cmd, *CLI], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    same_fold(two_folds / "fold_1", alone / "fold_1")
    # it ends saying what it wrote and what is next: the folds left, then the evaluation
    said = r.stdout.splitlines()
    assert said[-3:-1] == [
        "wrote:",
        f"  {alone / 'fold_1'}  best(_ema).pt, metrics.csv, train.log and plots of the epoch kept",
    ]
    assert said[-1].startswith(
        f"next: accelerate launch train.py --data {cache20} --run {alone} --fold 0,2,3,4 "
    )
    assert said[-1].endswith(f"then python evaluate.py --run {alone}")


def test_a_killed_multi_fold_run_skips_the_finished_fold_and_resumes_the_other(two_folds, cache20, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--fold", "0,1", "--data", str(cache20), "--run", str(run)]
    proc = subprocess.Popen([*cmd, *CLI], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Killed as soon as fold 1's first epoch is logged: fold 0 is finished, fold 1 part-way.
    in_fold_1 = False
    for line in proc.stderr:
        in_fold_1 = in_fold_1 or "fold 1: " in line
        if in_fold_1 and "epoch 1/2 " in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert len(rows(run / "fold_1" / "metrics.csv")) == 1, "the kill must land part-way through fold 1"
    finished = (run / "fold_0" / "metrics.csv").read_text()

    again = subprocess.run([*cmd, "--resume", *CLI], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed {run / 'fold_0' / STATE} after epoch 2" in again.stderr
    assert f"resumed {run / 'fold_1' / STATE} after epoch" in again.stderr
    assert (run / "fold_0" / "metrics.csv").read_text() == finished  # not one more epoch
    for k in (0, 1):
        same_fold(two_folds / f"fold_{k}", run / f"fold_{k}")


def test_accelerate_launch_trains_all_folds_in_one_process(cache20, tmp_path):  # of a 2-fold CV
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / CONFIG)]
    cmd += [str(ROOT / "train.py"), "--fold", "all", "--folds", "2", "--data", str(cache20)]
    cmd += ["--run", str(run), *"--max-epochs 1 --depth 10 --workers 0 --no-progress --min-epochs 1".split()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(2):
        assert f"fold {k} finished after epoch 1" in r.stderr
        assert (run / f"fold_{k}" / BEST).is_file()
    assert r.stderr.count("mixed precision bf16 requested but training on the CPU") == 1  # one process


@pytest.mark.parametrize(
    ("fold", "message"),
    [
        ("0,5", "error: --fold 0,5: this run has folds 0..4 (or give all)"),
        ("1,x", "error: --fold '1,x': give fold numbers like 1 or 0,2,4, or all"),
        (" , ", "error: --fold ' , ': give fold numbers like 1 or 0,2,4, or all"),
    ],
)
def test_a_wrong_fold_list_is_one_line_before_any_work(fold, message, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--fold", fold, "--data", str(tmp_path), "--run", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == message
    assert not run.exists()
