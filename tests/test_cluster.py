"""python -m brats.cv --launcher slurm, driven through submitit's local executor on CPU folds."""

import csv
import json

import psutil
from clitools import run_cli
from support import alive, eventually

from brats.training.cluster import ClusterRun, SlurmSpec, fold_jobs, minutes, submit_folds

TRAIN = ["--k-folds", "2", "--depth", "10", "--max-epochs", "3", "--min-epochs", "1", "--warmup-epochs", "1"]
TRAIN += ["--workers", "0", "--no-progress", "--report-to", "none"]


def rows(path):
    return list(csv.DictReader(open(path))) if path.exists() else []


def test_dry_run_prints_the_sbatch_script_and_each_fold_s_command(cache20, tmp_path, capsys):
    run = tmp_path / "run"
    r = run_cli(
        capsys, "brats/cv.py", "--launcher", "slurm", "--partition", "gpu", "--account", "lab",
        "--time", "1-12:00:00", "--gpus-per-fold", "2", "--mem-gb", "64", "--max-parallel", "1",
        "--fold", "0,1", "--data", cache20, "--run", run, "--dry-run", "--", *TRAIN,
    )  # fmt: skip
    assert r.code == 0, r.err[-2000:]
    script = r.out.splitlines()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=2160",
        "#SBATCH --array=0-1%1",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=64GB",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script, r.out
    folds = [line for line in script if line.startswith("# fold ")]
    assert len(folds) == 2 and all("--multi_gpu --num_processes 2" in f and "--resume" in f for f in folds)
    assert f"--fold 1 --data {cache20.resolve()} --run {run.resolve()}" in folds[1]
    assert folds[0].endswith(f">> {run.resolve() / 'fold_0' / 'train.log'}")
    assert script[-1] == "# nothing submitted (--dry-run)" and not run.exists()
    assert minutes("90") == 90 and minutes("30:30") == 31 and minutes("2-3") == 3060


def test_folds_as_jobs_resume_after_a_kill_then_the_run_is_evaluated(cache20, tmp_path, capsys):
    run = tmp_path / "run"
    spec = SlurmSpec(gpus_per_fold=0, time="20")
    job = ClusterRun(
        folds=[0, 1], data=str(cache20.resolve()), run=str(run), spec=spec, config="accelerate_config.yaml",
        train_args=TRAIN, evaluate_args=[],
    )  # fmt: skip
    jobs = fold_jobs(job)
    _, submitted = submit_folds("submitit-local", jobs, str(run), spec)
    metrics = run / "fold_0" / "metrics.csv"
    assert eventually((run / "fold_0" / "state.pt").exists, 300), "fold 0 never wrote its resume state"
    job = psutil.Process(int(submitted[0].job_id))  # as a node lost mid-fold: every process of the job
    killed = [job, *job.children(recursive=True)]
    for process in killed:
        process.kill()
    assert eventually(lambda: not any(alive(p.pid) for p in killed), 20), "a process of the job outlived it"
    assert submitted[1].result() == "fold 1"
    kept = rows(metrics)
    assert 1 <= len(kept) < 3, "the kill must land part-way through fold 0"

    # the same command again: fold 1 is skipped, fold 0 resumes, then one job evaluates the run
    r = run_cli(
        capsys, "brats/cv.py", "--launcher", "submitit-local", "--gpus-per-fold", "0", "--time", "20",
        "--fold", "0,1", "--data", cache20, "--run", run, "--evaluate-args", "--threshold youden",
        "--", *TRAIN,
    )  # fmt: skip
    assert r.code == 0, (r.out[-2000:], r.err[-2000:])
    log = (run / "fold_0" / "train.log").read_text()
    assert f"resumed {run.resolve() / 'fold_0' / 'state.pt'} after epoch {len(kept)}" in log
    assert [int(row["epoch"]) for row in rows(metrics)] == [1, 2, 3]
    assert rows(metrics)[: len(kept)] == kept
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1] and summary["decision"]["rule"] == "youden"
    assert r.out.splitlines()[-1] == f"next: python export.py --run {run.resolve()} --ensemble"


def test_the_multi_node_config_is_one_accelerate_reads():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parents[1] / "accelerate_multinode.yaml"))
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 8, 0)
    assert config.distributed_type == "MULTI_GPU" and config.main_process_port == 29500
    from brats.training.speed import split_effective_batch

    assert split_effective_batch(8, 4, 8) == (1, 1)  # --effective-batch 8 keeps the recipe on 8 GPUs
