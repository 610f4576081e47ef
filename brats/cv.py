"""Train the folds of a cross-validation concurrently: one fold per GPU of this machine
(brats.training.scheduler), or one SLURM job per fold (brats.training.cluster).

    python -m brats.cv --gpus 0,1,2,3 --data CACHE --run RUN [--fold 0,1,2,3,4] [-- TRAIN_ARGS]
    python -m brats.cv --launcher slurm --partition gpu --time 4:00:00 --data CACHE --run RUN
    python -m brats.cv --launcher slurm --partition gpu --data CACHE --run RUN --dry-run

Arguments after `--` go to train.py unchanged (e.g. -- --k-folds 5 --inner-val 0.15). On SLURM
the folds are a job array, each job the command a local fold runs (RUN/fold_K/train.log); a
preempted or timed-out fold is requeued and resumes; when every fold has succeeded a last job
evaluates the run (--evaluate-args, e.g. "--calibrate platt --threshold youden"). A rerun
resumes the unfinished folds and skips the finished ones.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path
from typing import Annotated

import typer

from brats.errors import BratsError, command_app, exit_on_error, finished, run_cli
from brats.training.cluster import LAUNCHERS, ClusterRun, SlurmSpec, run_on_cluster, sbatch_script
from brats.training.scheduler import CONFIG, ROOT, run_folds


def parse_list(text: str, what: str) -> list[str]:
    items = [t for t in text.replace(",", " ").split() if t]
    if not items:
        raise BratsError(f"--{what} is empty: give e.g. --{what} 0,1")
    return items


app = command_app(__doc__)
LOCAL, SLURM = "This machine (--launcher local)", "SLURM (--launcher slurm)"
CONFIG_FILE = str(ROOT / CONFIG)
LAUNCHER_HELP = (
    "local: the GPUs of this machine; slurm: a job per fold; submitit-local: the SLURM path's jobs as "
    "processes of this machine (tests)"
)
WAIT_HELP = (
    "wait for the jobs, then evaluate; --no-wait prints the job ids (on SLURM the evaluation is queued "
    "to start when every fold has succeeded) [default: wait]"
)


def local(help: str, *names: str, **kw):
    return typer.Option(*names, help=help, rich_help_panel=LOCAL, **kw)


def slurm(help: str, *names: str, **kw):
    return typer.Option(*names, help=help, rich_help_panel=SLURM, **kw)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@exit_on_error
def main(
    ctx: typer.Context,
    data: Annotated[str, typer.Option(help="prepared cache or raw BraTS folder")],
    run: Annotated[str, typer.Option(help="run folder")] = "runs/cv",
    folds: Annotated[
        str, typer.Option("--fold", "--folds", help="fold(s) to train: 0,1,2,3,4")
    ] = "0,1,2,3,4",
    size: Annotated[int, typer.Option(help="cube side when DATA must be prepared first")] = 128,
    config_file: Annotated[str, typer.Option(help="accelerate config")] = CONFIG_FILE,
    launcher: Annotated[str, typer.Option(help=LAUNCHER_HELP)] = "local",
    gpus: Annotated[
        str | None, local("GPU ids, one fold per GPU at a time (or cpu,cpu) [default: none]")
    ] = None,
    partition: Annotated[str | None, slurm("[default: the cluster's]")] = None,
    gpus_per_fold: Annotated[int, slurm("GPUs per fold's job (over 1: one fold on several GPUs)")] = 1,
    cpus_per_gpu: Annotated[int, slurm("CPU cores per GPU")] = 8,
    mem_gb: Annotated[int, slurm("memory per job; 0: the partition's default")] = 0,
    time: Annotated[str, slurm("time limit per job; a fold that needs longer resumes")] = "4:00:00",
    account: Annotated[str | None, slurm("[default: yours]")] = None,
    qos: Annotated[str | None, slurm("[default: none]")] = None,
    constraint: Annotated[str | None, slurm("e.g. a100 [default: none]")] = None,
    max_parallel: Annotated[int, slurm("folds running at once; 0: all")] = 0,
    evaluate_args: Annotated[
        str, slurm('evaluate.py options, e.g. "--calibrate platt" [default: none]')
    ] = "",
    wait: Annotated[bool, slurm(WAIT_HELP, "--wait/--no-wait", show_default=False)] = True,
    dry_run: Annotated[
        bool,
        slurm("print the sbatch script and each fold's command; submit nothing [default: off]", "--dry-run"),
    ] = False,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if launcher not in LAUNCHERS:
        raise BratsError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    try:
        wanted = [int(f) for f in parse_list(folds, "fold")]
    except ValueError as e:
        raise BratsError(f"--fold {folds!r}: give fold numbers like 0,1,2") from e
    if launcher == "local":
        return run_local(wanted, gpus, prepared(data, size), run, config_file, list(ctx.args))
    spec = SlurmSpec(
        partition=partition, gpus_per_fold=gpus_per_fold, cpus_per_gpu=cpus_per_gpu, mem_gb=mem_gb, time=time,
        account=account, qos=qos, constraint=constraint, max_parallel=max_parallel,
    )  # fmt: skip
    # jobs start on other machines, maybe in another folder: every path they get is absolute
    data, run = str(Path(data).resolve()), str(Path(run).resolve())
    job = ClusterRun(
        folds=wanted, data=data, run=run, spec=spec, config=config_file, train_args=list(ctx.args),
        evaluate_args=shlex.split(evaluate_args),
    )  # fmt: skip
    if dry_run:
        return print_dry_run(job)
    run_slurm(launcher, job, size, wait)


def run_local(
    folds: list[int], gpus: str | None, data: str, run: str, config: str, train_args: list[str]
) -> None:
    if not gpus:
        raise BratsError("--launcher local needs --gpus: e.g. --gpus 0,1,2,3 (one fold per GPU), or cpu,cpu")
    failed = run_folds(folds, parse_list(gpus, "gpus"), data, run, config, train_args)
    if failed:
        raise BratsError(
            f"fold(s) {', '.join(map(str, failed))} failed: see their train.log; rerun to resume them"
        )
    finished([], f"python evaluate.py --run {run}")


def run_slurm(launcher: str, job: ClusterRun, size: int, wait: bool) -> None:
    # the cache is prepared once, before any job: concurrent folds never prepare it together
    job = dataclasses.replace(job, data=prepared(job.data, size))
    failed = run_on_cluster(launcher, job, not wait)
    if failed is None:
        return
    if failed:
        raise BratsError(
            f"{'; '.join(failed)}: rerun the same command to resume (finished folds are skipped)"
        )
    from brats.runs.paths import RunPaths

    paths = RunPaths(job.run)
    finished(
        [(paths.fold(k), f"fold {k}: checkpoints, metrics.csv, train.log") for k in job.folds]
        + [(paths.report, "the verified report"), (paths.summary, "its figures, for export.py")],
        f"python export.py --run {job.run} --ensemble",
    )


def prepared(data: str, size: int) -> str:
    from brats.data.cache_reader import ensure_prepared

    return str(ensure_prepared(data, size))


def print_dry_run(job: ClusterRun) -> None:
    """What --launcher slurm would submit: the array's sbatch script and each job's command."""
    from brats.training.cluster import evaluate_job, fold_jobs

    print(sbatch_script(job.run, job.spec, len(job.folds)))
    for fold in fold_jobs(job):
        print(f"# {fold.label}: {shlex.join(fold.cmd)} >> {fold.log_path}")
    last = evaluate_job(job)
    print(f"# then, when every fold has succeeded: {shlex.join(last.cmd)} >> {last.log_path}")
    print("# nothing submitted (--dry-run)")


if __name__ == "__main__":
    run_cli(app)
