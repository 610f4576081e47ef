"""The fold scheduler: the folds of a cross-validation concurrently, one fold per GPU at a time.

Each fold is its own `accelerate launch train.py --fold K --resume` pinned to one GPU
(CUDA_VISIBLE_DEVICES), so a rerun skips finished folds and resumes killed ones, exactly as the
sequential `make cv`. A fold's output goes to RUN/fold_K/train.log. The cache is prepared once,
before any fold starts, so that concurrent folds never prepare it together. `--gpus cpu,cpu`
runs CPU folds side by side (for tests, or a many-core machine).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from brats.io.processes import child_dies_with_us
from brats.runs.paths import RunPaths

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py and accelerate_config.yaml
CONFIG = "accelerate_config.yaml"
POLL_S = 0.5


@dataclass
class Running:
    fold: int
    slot: str
    proc: subprocess.Popen
    log: IO[str]


def fold_command(fold: int, data: str, run: str, slot: str, config: str, train_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", config]
    cmd += ["--num_processes", "1", str(ROOT / "train.py"), "--fold", str(fold)]
    cmd += ["--data", data, "--run", run, "--resume", *train_args]
    return cmd + (["--cpu"] if slot == "cpu" else [])


def slot_env(slot: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = "" if slot == "cpu" else slot
    return env


def run_folds(
    folds: list[int], slots: list[str], data: str, run: str, config: str, train_args: list[str]
) -> list[int]:
    """Train `folds` over `slots` (GPU ids or 'cpu'), at most one fold per slot; returns the
    folds that failed (their logs say why)."""
    paths = RunPaths(run)
    pending, running, failed = list(folds), [], []
    free = list(slots)
    try:
        while pending or running:
            while pending and free:
                k, slot = pending.pop(0), free.pop(0)
                paths.fold(k).mkdir(parents=True, exist_ok=True)
                out = open(paths.log(k), "a")
                cmd = fold_command(k, data, run, slot, config, train_args)
                proc = subprocess.Popen(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=slot_env(slot),
                    preexec_fn=child_dies_with_us(),
                )
                running.append(Running(k, slot, proc, out))
                where = "the CPU" if slot == "cpu" else f"GPU {slot}"
                log.info(f"fold {k}: started on {where} -> {paths.log(k)}")
            time.sleep(POLL_S)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                r.log.close()
                free.append(r.slot)
                if r.proc.returncode:
                    failed.append(r.fold)
                    log.error(f"fold {r.fold}: failed (exit {r.proc.returncode}); see {paths.log(r.fold)}")
                else:
                    log.info(f"fold {r.fold}: done")
    finally:
        for r in running:  # interrupted: stop the folds still training (they resume next time)
            r.proc.terminate()
            r.proc.wait()
            r.log.close()
    return sorted(failed)
