"""Train cross-validation folds of the glioma grading model.

    accelerate launch train.py --fold 1 --data CACHE_OR_BRATS_ROOT --run runs/cv
    accelerate launch train.py --fold all --data ... --run runs/cv --resume    # every fold, restartable
    python train.py --fold 0 --data ... --policy baseline      # the report's first setup (RECIPE.md 1)

Several folds (--fold 0,2,4 or all) train one after the other in this one process. With
--resume a finished fold is skipped and a killed one continues where it stopped.
Defaults are the training report's final policy (RECIPE.md 6). Options left unset take the policy's value.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from brats.errors import BratsError, command_app, exit_on_error, finished, run_cli
from brats.training.config import BASELINE, TrainConfig, make_config

app = command_app(__doc__)


def parse_folds(text: str, k_total: int) -> list[int]:
    """--fold: one fold (1), several (0,2,4 or "0 2 4"), or all of the K-fold."""
    if text.strip().lower() == "all":
        return list(range(k_total))
    try:
        folds = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        folds = []
    if not folds:
        raise BratsError(f"--fold {text!r}: give fold numbers like 1 or 0,2,4, or all")
    if any(not 0 <= k < k_total for k in folds):
        raise BratsError(f"--fold {text}: this run has folds 0..{k_total - 1} (or give all)")
    return list(dict.fromkeys(folds))  # in the order given, each once


FINAL = TrainConfig()


def default(name: str, zero: str = "") -> str:
    """The option's default under the final policy and, where it differs, the baseline's; `zero`
    says what 0 means for this option."""

    def show(v) -> str:
        if isinstance(v, tuple):
            return ",".join(v)
        if isinstance(v, bool):
            return "on" if v else "off"
        if v is None:
            return "none"
        if v == 0 and zero:
            return f"0 ({zero})"
        if isinstance(v, float):
            return f"{v:.0e}".replace("e-0", "e-") if 0 < abs(v) < 1e-3 else f"{v:g}"
        return str(v)

    text = f"default: {show(getattr(FINAL, name))}"
    if name in BASELINE and BASELINE[name] != getattr(FINAL, name):
        text += f"; baseline: {show(BASELINE[name])}"
    return f"[{text}]"


DATA, MODEL, OPTIM, POLICY, HARDWARE, RUN = (
    "Data and folds",
    "Model",
    "Optimisation",
    "Policy (the training report's two setups)",
    "Hardware",
    "Run",
)


def opt(help: str, panel: str, *names: str, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


@app.command()
@exit_on_error
def main(
    data: Annotated[str, opt("prepared cache, or a BraTS folder / CSV manifest (prepared first)", DATA)],
    fold: Annotated[
        str, opt("fold(s) to train, 0-based: 1, 0,2,4 or all (one after the other, in this process)", DATA)
    ] = "0",
    run: Annotated[Path, opt("run folder (splits.json, config.json, fold_K/)", DATA)] = Path("runs/cv"),
    k_folds: Annotated[
        int | None, opt(f"K, the number of folds {default('folds')}", DATA, "--k-folds", "--folds")
    ] = None,
    split_seed: Annotated[int | None, opt(f"fold assignment seed {default('split_seed')}", DATA)] = None,
    inner_val: Annotated[
        float | None,
        opt(
            f"fraction of each fold's training patients that chooses the epoch {default('inner_val', 'off')}",
            DATA,
        ),
    ] = None,
    test_fraction: Annotated[
        float | None,
        opt(
            "stratified test set held out of every fold, scored by evaluate.py (the exported ensemble is "
            f"fitted and measured there) {default('test_fraction', 'off')}",
            DATA,
        ),
    ] = None,
    group_by: Annotated[
        str | None, opt("collection: each data collection in one validation fold [default: off]", DATA)
    ] = None,
    select: Annotated[
        str | None,
        opt(f"epoch kept: best (val AUC) or last (no selection, no early stop) {default('select')}", DATA),
    ] = None,
    size: Annotated[int | None, opt(f"cube side when --data is raw {default('size')}", DATA)] = None,
    policy: Annotated[
        str,
        opt(
            "final: the training report's final setup (4 modalities, cross-entropy with a balanced sampler, "
            "batch 4 x 2, backbone lr 1e-4, classifier 2x; RECIPE.md 6); baseline: its first setup (FLAIR "
            "only, LDAM + DRW, batch 2 x 2, classifier 10x; RECIPE.md 1). Options left unset take the "
            "policy's value",
            POLICY,
        ),
    ] = "final",
    loss: Annotated[str | None, opt(f"ce or ldam {default('loss')}", POLICY)] = None,
    drw_start_epoch: Annotated[
        int | None,
        opt(f"deferred re-weighting from this epoch {default('drw_start_epoch', 'off')}", POLICY),
    ] = None,
    sampler: Annotated[str | None, opt(f"inverse_freq or none {default('sampler')}", POLICY)] = None,
    augment: Annotated[
        bool | None,
        opt(f"spatial and intensity augmentation {default('augment')}", POLICY, "--augment/--no-augment"),
    ] = None,
    depth: Annotated[int | None, opt(f"ResNet depth 10/18/34/50 {default('depth')}", MODEL)] = None,
    layout: Annotated[
        str | None, opt("strided or medicalnet [default: strided; medicalnet with --pretrained]", MODEL)
    ] = None,
    modalities: Annotated[
        str | None, opt(f"comma list of t1,t1ce,t2,flair {default('modalities')}", MODEL)
    ] = None,
    dropout: Annotated[float | None, opt(f"before the classifier {default('dropout')}", MODEL)] = None,
    pretrained: Annotated[
        str | None,
        opt("medicalnet (fetched for --depth, cached) or a MedicalNet .pth [default: none]", MODEL),
    ] = None,
    max_epochs: Annotated[int | None, opt(f"{default('max_epochs')}", OPTIM)] = None,
    min_epochs: Annotated[
        int | None, opt(f"no early stop before this epoch {default('min_epochs')}", OPTIM)
    ] = None,
    patience: Annotated[
        int | None, opt(f"epochs without a better val AUC before stopping {default('patience')}", OPTIM)
    ] = None,
    batch_size: Annotated[int | None, opt(f"per process {default('batch_size')}", OPTIM)] = None,
    grad_accum: Annotated[int | None, opt(f"micro-batches per update {default('grad_accum')}", OPTIM)] = None,
    effective_batch: Annotated[
        int | None,
        opt(
            f"keep batch x accumulation x processes at this, e.g. 8 {default('effective_batch', 'off')}",
            OPTIM,
        ),
    ] = None,
    lr: Annotated[float | None, opt(f"backbone learning rate (Adam) {default('lr')}", OPTIM)] = None,
    classifier_lr_mult: Annotated[
        float | None, opt(f"classifier lr = lr x this {default('classifier_lr_mult')}", OPTIM)
    ] = None,
    weight_decay: Annotated[float | None, opt(f"{default('weight_decay')}", OPTIM)] = None,
    warmup_epochs: Annotated[
        float | None, opt(f"linear warm-up, then cosine {default('warmup_epochs')}", OPTIM)
    ] = None,
    warmup_fraction: Annotated[
        float | None,
        opt(f"warm-up as a fraction of --max-epochs {default('warmup_fraction', 'off')}", OPTIM),
    ] = None,
    max_grad_norm: Annotated[
        float | None, opt(f"gradient clipping {default('max_grad_norm', 'off')}", OPTIM)
    ] = None,
    ema_decay: Annotated[
        float | None, opt(f"EMA of the weights; 0.995 when used {default('ema_decay', 'off')}", OPTIM)
    ] = None,
    seed: Annotated[
        int | None, opt(f"initialisation, sampling, augmentation {default('seed')}", OPTIM)
    ] = None,
    mixed_precision: Annotated[
        str | None, opt("no, fp16 or bf16 [default: the accelerate config's; fp32 on a CPU]", HARDWARE)
    ] = None,
    sync_bn: Annotated[
        bool | None,
        opt(f"SyncBatchNorm across processes {default('sync_bn')}", HARDWARE, "--sync-bn/--no-sync-bn"),
    ] = None,
    cache_device: Annotated[
        str | None,
        opt(
            f"fold volumes held on: auto (GPU if they fit), cuda, cpu, off {default('cache_device')}",
            HARDWARE,
        ),
    ] = None,
    workers: Annotated[
        int | None, opt(f"DataLoader workers with --cache-device off {default('workers')}", HARDWARE)
    ] = None,
    val_batch_size: Annotated[
        int | None, opt(f"validation batch {default('val_batch_size', '2 x --batch-size')}", HARDWARE)
    ] = None,
    channels_last: Annotated[
        bool | None,
        opt(
            f"channels_last_3d on a GPU {default('channels_last')}",
            HARDWARE,
            "--channels-last/--no-channels-last",
        ),
    ] = None,
    compile: Annotated[
        bool, opt("torch.compile the model (one-off cost) [default: off]", HARDWARE, "--compile")
    ] = False,
    compile_backend: Annotated[
        str | None, opt(f"inductor, or aot_eager (no code generation) {default('compile_backend')}", HARDWARE)
    ] = None,
    deterministic: Annotated[
        bool, opt("deterministic algorithms on a GPU (slower) [default: off]", HARDWARE, "--deterministic")
    ] = False,
    cpu: Annotated[
        bool,
        opt(
            "train on the CPU even with a GPU (gloo for several processes) [default: off]", HARDWARE, "--cpu"
        ),
    ] = False,
    resume: Annotated[
        bool,
        opt(
            "continue each fold after its last completed epoch; skip finished folds [default: off]",
            RUN,
            "--resume",
        ),
    ] = False,
    state_every: Annotated[
        float | None,
        opt(
            "seconds between state.pt writes (a new best always writes) "
            f"{default('state_every', 'every epoch')}",
            RUN,
        ),
    ] = None,
    progress: Annotated[
        bool, opt("progress bars [default: on]", RUN, "--progress/--no-progress", show_default=False)
    ] = True,
    report_to: Annotated[
        str | None,
        opt(
            "experiment trackers: tensorboard, mlflow, wandb (comma-separated), all (those installed) or "
            "none; each fold is a run holding its settings and each epoch's metrics "
            "[default: auto: tensorboard when installed]",
            RUN,
        ),
    ] = None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = make_config(
        policy,
        data=str(Path(data).resolve()),
        run=str(run),
        folds=k_folds,
        split_seed=split_seed,
        inner_val=inner_val,
        test_fraction=test_fraction,
        group_by=group_by,
        select=select,
        size=size,
        depth=depth,
        layout=layout,
        modalities=tuple(m.strip() for m in modalities.split(",")) if modalities else None,
        dropout=dropout,
        pretrained=pretrained,
        max_epochs=max_epochs,
        min_epochs=min_epochs,
        patience=patience,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        classifier_lr_mult=classifier_lr_mult,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        warmup_fraction=warmup_fraction,
        max_grad_norm=max_grad_norm,
        loss=loss,
        drw_start_epoch=drw_start_epoch,
        sampler=sampler,
        augment=augment,
        ema_decay=ema_decay,
        mixed_precision=mixed_precision,
        sync_bn=sync_bn,
        seed=seed,
        state_every=state_every,
        workers=workers,
        cache_device=cache_device,
        val_batch_size=val_batch_size,
        channels_last=channels_last,
        compile=compile or None,
        compile_backend=compile_backend,
        deterministic=deterministic or None,
        effective_batch=effective_batch,
        cpu=cpu or None,
        resume=resume or None,
        progress=progress,
        report_to=report_to,
    )
    cfgs = [dataclasses.replace(cfg, fold=k) for k in parse_folds(fold, cfg.folds)]
    from brats.training.engine import train_folds  # torch is imported only once the options are valid

    train_folds(cfgs)
    if os.environ.get("RANK", "0") == "0":
        say_done(cfgs)


def say_done(cfgs: list[TrainConfig]) -> None:
    """The fold folders written and what comes next: the folds left, or the evaluation."""
    from brats.runs.paths import RunPaths

    cfg = cfgs[0]
    paths = RunPaths(cfg.run)
    files = [
        (paths.fold(c.fold), "best(_ema).pt, metrics.csv, train.log and plots of the epoch kept")
        for c in cfgs
    ]
    left = sorted(set(range(cfg.folds)) - set(paths.trained(cfg.folds)))
    if left:
        step = (
            f"accelerate launch train.py --data {cfg.data} --run {cfg.run} --fold {','.join(map(str, left))} "
            f"--resume (the same options), then python evaluate.py --run {cfg.run}"
        )
    else:
        step = f"python evaluate.py --run {cfg.run}"
    finished(files, step)


if __name__ == "__main__":
    run_cli(app)
