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
from pathlib import Path
from typing import Annotated

import typer

from brats.errors import BratsError, exit_on_error, run_cli
from brats.training.config import make_config

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


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


@app.command()
@exit_on_error
def main(
    data: Annotated[
        str, typer.Option(help="prepared cache, or a BraTS folder / CSV manifest (prepared first)")
    ],
    fold: Annotated[
        str, typer.Option(help="fold(s) to train, 0-based: 1, 0,2,4 or all (in turn, in this process)")
    ] = "0",
    run: Annotated[Path, typer.Option(help="run folder (splits.json, config.json, fold_K/)")] = Path(
        "runs/cv"
    ),
    policy: Annotated[str, typer.Option(help="final (RECIPE.md 6) or baseline (RECIPE.md 1)")] = "final",
    folds: Annotated[int | None, typer.Option(help="K of the K-fold [5]")] = None,
    split_seed: Annotated[int | None, typer.Option(help="fold assignment seed [42]")] = None,
    inner_val: Annotated[
        float | None, typer.Option(help="fraction of training patients that choose the epoch [0=off]")
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(help="stratified test set held out of every fold, scored by evaluate.py [0=off]"),
    ] = None,
    group_by: Annotated[
        str | None, typer.Option(help="collection: each data collection in one validation fold [off]")
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(help="epoch kept: best (val AUC) or last (no selection, no early stop) [best]"),
    ] = None,
    size: Annotated[int | None, typer.Option(help="cube side when --data is raw [128]")] = None,
    depth: Annotated[int | None, typer.Option(help="ResNet depth 10/18/34/50 [50]")] = None,
    layout: Annotated[
        str | None, typer.Option(help="strided or medicalnet [strided; medicalnet with --pretrained]")
    ] = None,
    modalities: Annotated[str | None, typer.Option(help="comma list of t1,t1ce,t2,flair [policy]")] = None,
    dropout: Annotated[float | None, typer.Option(help="[0.4]")] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="medicalnet (fetched for --depth, cached) or a MedicalNet .pth")
    ] = None,
    max_epochs: Annotated[int | None, typer.Option(help="[60]")] = None,
    min_epochs: Annotated[int | None, typer.Option(help="[15; baseline 10]")] = None,
    patience: Annotated[int | None, typer.Option(help="[10; baseline 7]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="per process [4; baseline 2]")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="[2]")] = None,
    lr: Annotated[float | None, typer.Option(help="backbone lr [1e-4]")] = None,
    classifier_lr_mult: Annotated[float | None, typer.Option(help="[2; baseline 10]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[1e-4]")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="[3]")] = None,
    warmup_fraction: Annotated[
        float | None, typer.Option(help="warm-up as a fraction of --max-epochs [0; baseline 0.1]")
    ] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="[0 = off]")] = None,
    loss: Annotated[str | None, typer.Option(help="ce or ldam [policy]")] = None,
    drw_start_epoch: Annotated[int | None, typer.Option(help="[0 = off; baseline 25]")] = None,
    sampler: Annotated[str | None, typer.Option(help="inverse_freq or none [inverse_freq]")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="[on]")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="0 = off; 0.995 when enabled [0]")] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="no/fp16/bf16 [accelerate config]")] = None,
    sync_bn: Annotated[bool | None, typer.Option("--sync-bn/--no-sync-bn", help="[off]")] = None,
    seed: Annotated[int | None, typer.Option(help="[42]")] = None,
    state_every: Annotated[
        float | None,
        typer.Option(help="seconds between state.pt writes (a new best always writes) [0: every epoch]"),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers, --cache-device off [2]")] = None,
    cache_device: Annotated[
        str | None, typer.Option(help="fold volumes held on: auto (GPU if they fit), cuda, cpu, off [auto]")
    ] = None,
    val_batch_size: Annotated[int | None, typer.Option(help="validation batch [2 x batch]")] = None,
    channels_last: Annotated[
        bool | None, typer.Option("--channels-last/--no-channels-last", help="channels_last_3d on GPU [on]")
    ] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile (one-off cost)")] = False,
    compile_backend: Annotated[
        str | None, typer.Option(help="torch.compile backend: inductor or aot_eager (no code generation)")
    ] = None,
    deterministic: Annotated[
        bool, typer.Option("--deterministic", help="cuDNN deterministic kernels on a GPU")
    ] = False,
    effective_batch: Annotated[
        int | None, typer.Option(help="keep batch x accumulation x processes at this, e.g. 8 [off]")
    ] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="force the CPU (gloo for multi-process)")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue after the last completed epoch")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = make_config(
        policy,
        data=str(Path(data).resolve()),
        run=str(run),
        folds=folds,
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
    )
    cfgs = [dataclasses.replace(cfg, fold=k) for k in parse_folds(fold, cfg.folds)]
    from brats.training.engine import train_folds  # torch is imported only once the options are valid

    train_folds(cfgs)


if __name__ == "__main__":
    run_cli(app)
