"""Folds trained concurrently by brats.cv: one slot each, restartable, one log per fold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--depth", "10", "--max-epochs", "1", "--min-epochs", "1", "--workers", "0", "--no-progress"]


def run_cv(cache: Path, run: Path, folds: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "brats.cv", "--gpus", "cpu,cpu", "--folds", folds]
    cmd += ["--data", str(cache), "--run", str(run), "--", *ARGS]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_two_folds_side_by_side_then_a_rerun_skips_them(cache20, tmp_path):
    run = tmp_path / "run"
    r = run_cv(cache20, run, "0,1")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    started = [i for i, line in enumerate(lines) if ": started on the CPU" in line]
    done = [i for i, line in enumerate(lines) if line.endswith(": done")]
    assert len(started) == 2 and len(done) == 2
    assert max(started) < min(done)  # the second fold started before the first ended
    for k in (0, 1):
        log = (run / f"fold_{k}" / "train.log").read_text()
        assert f"fold {k} finished after epoch 1" in log
        assert (run / f"fold_{k}" / "best.pt").is_file()
    before = (run / "fold_0" / "metrics.csv").read_text()

    again = run_cv(cache20, run, "0,1")
    assert again.returncode == 0, again.stderr
    assert (run / "fold_0" / "metrics.csv").read_text() == before
    assert "resumed" in (run / "fold_0" / "train.log").read_text()  # appended, not restarted


def test_a_failing_fold_is_named_and_the_others_finish(cache20, tmp_path):
    run = tmp_path / "run"
    r = run_cv(cache20, run, "0,7")  # fold 7 does not exist in a 5-fold run
    assert r.returncode == 1
    assert "fold(s) 7 failed" in r.stderr and "Traceback" not in r.stderr
    assert (run / "fold_0" / "best.pt").is_file()
