"""Cross-validation on a SLURM cluster through submitit: one job per fold (a job array), then
one job that evaluates the run.

Each fold's job runs the command a local fold runs (`accelerate launch train.py --fold K
--resume ...`, brats.training.scheduler.fold_command), with its output appended to
RUN/fold_K/train.log. A job that SLURM preempts or that reaches its time limit is requeued by
submitit (FoldJob is checkpointable) and its fold resumes from its last state.pt, as a killed
local fold does; a rerun of the same command resumes every unfinished fold and skips the others.

`submitit-local` runs the same jobs with submitit's local executor (subprocesses of this
machine): the path the tests drive on CPU folds. It does not replace the local launcher: that
executor gives every job the same first GPUs, where the local launcher pins one fold per GPU.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from brats.errors import BratsError
from brats.io.processes import child_dies_with_us
from brats.runs.paths import RunPaths
from brats.training.scheduler import ROOT, fold_command

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "submitit-local")
JOBS_FOLDER = "slurm"  # RUN/slurm/: submitit's pickles and job logs
TIME = re.compile(r"^(?:(\d+)-)?(\d+(?::\d+){0,2})$")


def minutes(text: str) -> int:
    """A SLURM time limit in whole minutes (seconds rounded up), in sbatch's forms: MM, MM:SS,
    HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    m = TIME.match(text.strip())
    parts = [int(p) for p in m.group(2).split(":")] if m else []
    if not parts:
        raise BratsError(f"--time {text!r}: give a SLURM time such as 4:00:00, 1-12:00:00 or 90 (minutes)")
    if m.group(1) is not None:  # D-HH[:MM[:SS]]
        hours, mins, secs = (parts + [0, 0])[:3]
        total = int(m.group(1)) * 1440 + hours * 60 + mins + (secs > 0)
    elif len(parts) == 1:
        total = parts[0]
    elif len(parts) == 2:  # MM:SS
        total = parts[0] + (parts[1] > 0)
    else:  # HH:MM:SS
        total = parts[0] * 60 + parts[1] + (parts[2] > 0)
    if total < 1:
        raise BratsError(f"--time {text!r}: at least one minute")
    return total


@dataclass(frozen=True, kw_only=True)
class SlurmSpec:
    """What each fold's job asks SLURM for."""

    partition: str | None = None
    gpus_per_fold: int = 1  # one fold over several GPUs: accelerate launch --multi_gpu
    cpus_per_gpu: int = 8  # DataLoader and augmentation threads
    mem_gb: int = 0  # 0: the partition's default
    time: str = "4:00:00"  # per job; a fold that needs longer resumes when requeued
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    max_parallel: int = 0  # folds running at once (0: all)

    def __post_init__(self) -> None:
        if self.gpus_per_fold < 0 or self.cpus_per_gpu < 1 or self.mem_gb < 0 or self.max_parallel < 0:
            raise BratsError(
                "--gpus-per-fold, --cpus-per-gpu, --mem-gb and --max-parallel must not be negative "
                "(and --cpus-per-gpu at least 1)"
            )
        minutes(self.time)

    def parameters(self, name: str, folds: int) -> dict:
        """sbatch parameters in submitit's SlurmExecutor names."""
        gpus = self.gpus_per_fold
        params = {
            "job_name": name,
            "time": minutes(self.time),
            "nodes": 1,
            "ntasks_per_node": 1,  # one task: accelerate launch starts a process per GPU
            "cpus_per_task": self.cpus_per_gpu * max(1, gpus),
            "array_parallelism": self.max_parallel or folds,
            "signal_delay_s": 120,  # time between the warning signal and the kill: the requeue
            "stderr_to_stdout": True,
        }
        optional = {
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "mem": f"{self.mem_gb}GB" if self.mem_gb else None,
            "gpus_per_node": gpus,  # left out for CPU jobs
        }
        return {**params, **{k: v for k, v in optional.items() if v}}


@dataclass(frozen=True, kw_only=True)
class ClusterRun:
    """A cross-validation to run as jobs: which folds, on what, and the options passed on."""

    folds: list[int]
    data: str  # absolute: jobs start on other machines, maybe in another folder
    run: str  # absolute, as `data`
    spec: SlurmSpec
    config: str  # the accelerate config
    train_args: list[str]  # passed to train.py unchanged
    evaluate_args: list[str]  # passed to evaluate.py unchanged


class FoldJob:
    """One fold's training, as submitit runs it on a node: the local fold command, output to
    RUN/fold_K/train.log. Requeued by submitit on preemption or time-out (`checkpoint`): the
    command resumes the fold."""

    def __init__(self, cmd: list[str], log_path: Path, label: str):
        self.cmd, self.log_path, self.label = cmd, Path(log_path), label

    def __call__(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as out:
            code = subprocess.run(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=child_dies_with_us()
            ).returncode
        if code:
            raise RuntimeError(f"{self.label} failed (exit {code}): see {self.log_path}")
        return self.label

    def checkpoint(self, *args, **kwargs):
        """Preempted or out of time: submitit requeues the same job; --resume continues the fold."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def fold_jobs(job: ClusterRun) -> list[FoldJob]:
    paths, spec = RunPaths(job.run), job.spec
    jobs = []
    for k in job.folds:
        cmd = fold_command(
            k, job.data, job.run, "gpu" if spec.gpus_per_fold else "cpu", job.config, job.train_args
        )
        if spec.gpus_per_fold > 1:  # one fold over the job's GPUs
            at = cmd.index("--num_processes")
            cmd[at : at + 2] = ["--multi_gpu", "--num_processes", str(spec.gpus_per_fold)]
        jobs.append(FoldJob(cmd, paths.log(k), f"fold {k}"))
    return jobs


def evaluate_job(job: ClusterRun) -> FoldJob:
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        "--run",
        job.run,
        "--data",
        job.data,
        *job.evaluate_args,
    ]
    return FoldJob(cmd, Path(job.run) / JOBS_FOLDER / "evaluate.log", "evaluation")


def make_executor(launcher: str, run: str, spec: SlurmSpec, n: int):
    """submitit's SLURM executor (or its local one), its files in RUN/slurm/."""
    submitit = import_submitit(launcher)
    folder = Path(run) / JOBS_FOLDER / "%j"
    if launcher == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=20)
        except RuntimeError as e:  # no srun here
            raise BratsError(
                f"--launcher slurm: {e} (run it on the cluster's login node; --dry-run shows the job)"
            ) from e
        executor.update_parameters(**spec.parameters(f"brats-{Path(run).name}", n))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=minutes(spec.time), gpus_per_node=0)
    return executor


def import_submitit(launcher: str):
    try:
        import submitit
    except ImportError as e:
        raise BratsError(
            f"--launcher {launcher} needs submitit: pip install -e '.[slurm]' (or pip install submitit)"
        ) from e
    return submitit


def sbatch_script(run: str, spec: SlurmSpec, n: int) -> str:
    """The sbatch script the fold array is submitted with (what --dry-run prints)."""
    import_submitit("slurm")
    from submitit.slurm.slurm import _make_sbatch_string

    params = spec.parameters(f"brats-{Path(run).name}", n)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {Path(run) / JOBS_FOLDER / '%j'}"
    return _make_sbatch_string(command=command, folder=Path(run) / JOBS_FOLDER / "%j", map_count=n, **params)


def submit_folds(launcher: str, jobs: list[FoldJob], run: str, spec: SlurmSpec) -> tuple[object, list]:
    """Submit the fold jobs as one array; returns the executor and the submitit jobs."""
    executor = make_executor(launcher, run, spec, len(jobs))
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    for job, fold_job in zip(submitted, jobs):
        log.info(f"{fold_job.label}: job {job.job_id} -> {fold_job.log_path}")
    return executor, submitted


def wait(submitted: list, jobs: list[FoldJob]) -> list[str]:
    """Wait for every job; returns one line per job that failed."""
    failed = []
    for job, fold_job in zip(submitted, jobs):
        try:
            job.result()
            log.info(f"{fold_job.label}: done (job {job.job_id})")
        except Exception as e:  # a failed or cancelled job: its log says why
            reason = str(e).strip().splitlines()
            failed.append(
                f"{fold_job.label} (job {job.job_id}): {reason[-1] if reason else type(e).__name__}"
            )
    return failed


def run_on_cluster(launcher: str, job: ClusterRun, no_wait: bool = False) -> list[str] | None:
    """Submit the folds, wait, then evaluate the run in one more job. With `no_wait`, print the
    job ids and return None (on SLURM the evaluation is submitted to start when every fold has
    succeeded). Returns the lines of the jobs that failed ([] when all succeeded)."""
    jobs = fold_jobs(job)
    for k in job.folds:
        RunPaths(job.run).fold(k).mkdir(parents=True, exist_ok=True)
    executor, submitted = submit_folds(launcher, jobs, job.run, job.spec)
    one_gpu = {"gpus_per_node": min(1, job.spec.gpus_per_fold)} if launcher == "slurm" else {}
    if no_wait:
        array = submitted[0].job_id.split("_")[0]
        print(
            f"submitted folds {','.join(map(str, job.folds))}: jobs {' '.join(j.job_id for j in submitted)}"
        )
        if launcher == "slurm":
            # a failed fold cancels the evaluation instead of leaving it pending for ever
            executor.update_parameters(
                dependency=f"afterok:{array}", additional_parameters={"kill-on-invalid-dep": "yes"}, **one_gpu
            )
            evaluation = executor.submit(evaluate_job(job))
            print(f"evaluation: job {evaluation.job_id}, starts when every fold has succeeded")
        return None
    failed = wait(submitted, jobs)
    if failed:
        return failed
    executor.update_parameters(**one_gpu)
    evaluation = evaluate_job(job)
    return wait([executor.submit(evaluation)], [evaluation])
