"""Training of cross-validation folds on Hugging Face Accelerate.

`train_fold` = `setup` (seed -> data -> model -> optimizer -> accelerator.prepare -> scheduler
sized in optimizer updates -> EMA and the checkpoint keeper: a frozen `Fold`) ->
`resume_or_refuse` (the `FoldState`, what changes while it trains) -> `fit`; `train_folds` does
that for several folds in turn in one process, under one Accelerator. Each epoch (`run_epoch`):
`train_epoch`, validate the model and its EMA copy, tell the `CheckpointKeeper` (brats.runs.keeper:
it decides what becomes best.pt / best_ema.pt), then `write_epoch`: the kept checkpoints,
metrics.csv and, when due, the resume state.

Exact resume: every random stream is reseeded per epoch (`epoch_seed`), and the resume state
(`resume_objects`) holds the model, optimizer, scheduler, grad scaler, EMA, the kept epochs,
the fold's progress and the RNG. A run killed at any moment and resumed repeats the
epochs since the state was last written (the one it was in, with `--state-every 0`), with the
same numbers.

Data: by default the fold's volumes are resident (`--cache-device auto`: one float16 tensor on
the GPU when it fits, else in host memory; brats.training.datasets) and a batch is an index gather on
the device; `--cache-device off` is the DataLoader-with-workers path. Both draw the same batches
from the same seeded sampler, so on the CPU they give the same metrics. No step reads a value
back to the host except at optimizer-update boundaries (the non-finite-loss check).

Several processes: the effective batch is batch x accumulation x processes, so N GPUs at the
recipe's batch 4 x 2 train with an effective batch of 8N, not the single-GPU recipe;
`--effective-batch 8` keeps the recipe's 8 by lowering accumulation, then the per-process batch.
BatchNorm stays per process (`--sync-bn` converts to SyncBatchNorm): each GPU normalises over
its own batch as a single-GPU run does; SyncBatchNorm would add a collective per BN layer (53
in ResNet-50) for statistics over a few more samples.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from brats.data.cache_reader import is_cache, open_cache, open_data
from brats.data.cohort import UNKNOWN, check_trainable, find_cases
from brats.data.folds import load_or_make_splits, make_splits, protocol
from brats.errors import BratsError
from brats.evaluation.metrics import METRICS
from brats.evaluation.scoring import own_forward, predict, score
from brats.io.atomic import (
    check_output_dir,
    refuse_inputs,
    remove_stale_temps,
    write_csv_atomic,
    write_json_atomic,
)
from brats.io.processes import die_with_launcher, exclusive_lock
from brats.models.pretrained import load_pretrained, pretrained_problem, resolve_pretrained
from brats.models.resnet import build_model, param_groups
from brats.runs.checkpoint import (
    RngState,
    Stateful,
    load_resume_state,
    save_resume_state,
)
from brats.runs.identity import (
    check_one_run,
    check_resume,
    check_run_config,
    check_run_preprocess,
    write_run_config,
)
from brats.runs.keeper import Candidate, CheckpointKeeper, FoldRecord
from brats.runs.paths import RunPaths
from brats.training.augment import augment_batch
from brats.training.config import TrainConfig, split_spec
from brats.training.datasets import (
    CachedVolumes,
    ResidentVolumes,
    make_sampler,
    resident_loader,
    resolve_cache_device,
    volume_bytes,
)
from brats.training.ema import ModelEma
from brats.training.losses import apply_drw, make_criterion
from brats.training.speed import (
    FirstStepTimer,
    configure_backends,
    match_state_layout,
    maybe_compile,
    memory_format,
    split_effective_batch,
)
from brats.training.trackers import finish_trackers, log_metrics, resolve_trackers, start_trackers

log = get_logger(__name__)

STREAM_DROPOUT, STREAM_SAMPLER, STREAM_AUGMENT = 0, 1, 2
VALIDATION_PRECISION = "no"  # fp32 (accelerate's name): see `validate`


class TrainingError(BratsError):
    pass


SAVED = ("epoch", "bad_epochs", "finished", "stop_reason", "history")  # FoldState's fields in state.pt


@dataclass(kw_only=True)
class FoldState:
    """What changes while a fold trains: how far it got (saved in state.pt; the kept epochs and
    their AUCs belong to the CheckpointKeeper)."""

    epoch: int = 0  # completed epochs (1-based numbering of the last one)
    bad_epochs: int = 0  # epochs since the last new best of the checkpoint the policy evaluates
    finished: bool = False
    stop_reason: str = ""
    history: list[dict] = field(default_factory=list)  # metrics.csv rows
    # when state.pt was last written (this process's clock; not saved)
    state_written: float = field(default_factory=time.monotonic)

    def record(self, epoch: int, row: dict, improved: bool, cfg: TrainConfig, ema: bool) -> None:
        """Epoch `epoch` is done: `improved` says whether the checkpoint the policy evaluates
        (EMA's when `ema`) reached a new best. Decides early stopping and --max-epochs."""
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        self.epoch = epoch
        self.history.append(row)
        if epoch >= cfg.min_epochs and self.bad_epochs >= cfg.patience:
            self.finished = True
            kind = "EMA val AUC" if ema else "val AUC"
            self.stop_reason = f"early stop: no new best {kind} for {cfg.patience} epochs"
        elif epoch == cfg.max_epochs:
            self.finished, self.stop_reason = True, f"reached --max-epochs {cfg.max_epochs}"

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in SAVED}

    def status(self) -> dict[str, Any]:
        """status.json: how far the fold got, readable without loading state.pt."""
        return {"epochs": self.epoch, "finished": self.finished, "stop_reason": self.stop_reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Fields a later version added keep their defaults; fields it dropped are ignored; a
        field of the wrong type raises ValueError (load_resume_state says which file)."""
        if not isinstance(state, dict):
            raise ValueError(f"fold_state is a {type(state).__name__}")
        kinds = {"epoch": int, "bad_epochs": int, "finished": bool, "stop_reason": str, "history": list}
        for name, kind in kinds.items():
            if name in state:
                value = state[name]
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise ValueError(f"fold_state {name} is {value!r}, not {kind.__name__}")
                if kind is int and value < 0:
                    raise ValueError(f"fold_state {name} is {value}")
                setattr(self, name, value)
        if len(self.history) != self.epoch:
            raise ValueError(f"fold_state says {self.epoch} epochs but holds {len(self.history)} rows")


def epoch_seed(seed: int, epoch: int, stream: int, process: int = 0) -> int:
    """The seed of one random stream for one epoch (and one process).

    The rule that makes resume exact: every random consumer in training (dropout and the other
    torch-global draws, the sampler, augmentation) draws from a stream that is reseeded from
    (seed, epoch, stream[, process]) at the start of each epoch, never from state carried over
    from the epochs before. A new consumer gets its own stream number.
    """
    return (seed * 1_000_003 + epoch * 1009 + stream * 101 + process) % (2**63)


def resolve_mixed_precision(cfg: TrainConfig) -> tuple[str, str | None]:
    """bf16/fp16 from the flag or the accelerate config; fp32 on a CPU (with the reason)."""
    requested = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    on_gpu = torch.cuda.is_available() and not cfg.cpu
    if requested != "no" and not on_gpu:
        return "no", f"mixed precision {requested} requested but training on the CPU: using fp32"
    return requested, None


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """lr multiplier per optimizer update: linear warm-up to 1, then cosine to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True, kw_only=True)
class FoldData:
    """The fold's loaders and what the checkpoints record about its data."""

    train_loader: DataLoader
    val_loader: DataLoader
    sample_gen: torch.Generator  # drives the training sampler; reseeded per epoch
    class_counts: list[int]  # training patients per class (LGG, HGG)
    splits_fingerprint: str  # of the cohort splits.json was made for
    patients_fingerprint: str  # of this fold's train/val/test patients
    val_patients: list[str]  # the patients that choose the epoch (sorted)
    preprocess: dict[str, Any]  # the cache's preprocessing contract
    val_ids: list[str]  # the validation patients in the validation loader's order
    val_labels: np.ndarray  # (N,) their labels, same order


def load_data(cfg: TrainConfig, accelerator: Accelerator, paths: RunPaths) -> FoldData:
    """The fold's training and validation loaders over the prepared cache (prepared first if
    `cfg.data` is raw); the main process writes splits.json and config.json first."""
    with accelerator.main_process_first():
        cached = open_data(cfg.data, cfg.size)
        ids, labels = cached.patient_ids, cached.labels.tolist()
        splits = load_or_make_splits(paths.splits, ids, labels, groups=cached.collections, **split_spec(cfg))
        if accelerator.is_main_process:
            check_run_config(paths.root, cfg)
            check_run_preprocess(paths.root, cached.preprocess)
    fold = splits.fold(cfg.fold, ids, labels)
    train_idx, val_idx = cached.indices(fold.train), cached.indices(fold.val)
    train_labels = cached.labels[train_idx]
    class_counts = np.bincount(train_labels, minlength=2).tolist()
    log.info(
        f"fold {cfg.fold}: {len(train_idx)} train ({class_counts[1]} HGG, {class_counts[0]} LGG), "
        f"{len(val_idx)} val{f', {len(splits.test)} held out as the test set' if splits.test else ''}; "
        f"{protocol(splits.inner_val, cfg.select)}; "
        f"policy {cfg.policy}; channels {','.join(cfg.modalities)}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}; effective batch "
        f"{cfg.batch_size} x {cfg.grad_accum} x {accelerator.num_processes} = "
        f"{cfg.batch_size * cfg.grad_accum * accelerator.num_processes}"
    )
    sample_gen = torch.Generator()
    sampler = make_sampler(cfg.sampler, train_labels, sample_gen)
    drop_last = len(train_idx) > cfg.batch_size  # a batch of 1 breaks BatchNorm at 1^3 feature maps
    val_batch = cfg.val_batch_size or 2 * cfg.batch_size
    nbytes = volume_bytes(cached, len(train_idx) + len(val_idx), len(cfg.modalities))
    where, why = resolve_cache_device(cfg.cache_device, nbytes, accelerator.device)
    log.info(f"fold {cfg.fold}: data {'resident, ' + why if where != 'off' else 'DataLoader workers'}")
    if where == "off":
        pin = accelerator.device.type == "cuda"
        train_ds = CachedVolumes(cached, train_idx, cfg.modalities)
        train_loader = DataLoader(
            train_ds,
            cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.workers,
            pin_memory=pin,
            drop_last=drop_last,
        )
        val_ds = CachedVolumes(cached, val_idx, cfg.modalities)
        val_loader = DataLoader(val_ds, val_batch, shuffle=False, num_workers=cfg.workers, pin_memory=pin)
    else:
        # One tensor for the fold, train patients first; each loader sees its part as a view.
        device = accelerator.device if where == "cuda" else torch.device("cpu")
        resident = ResidentVolumes(
            cached, train_idx + val_idx, cfg.modalities, device, pin=accelerator.device.type == "cuda"
        )
        n = len(train_idx)
        train_loader = resident_loader(resident.part(0, n), cfg.batch_size, sampler, drop_last)
        val_loader = resident_loader(resident.part(n, len(resident)), val_batch)
    return FoldData(
        train_loader=train_loader,
        val_loader=val_loader,
        sample_gen=sample_gen,
        class_counts=class_counts,
        splits_fingerprint=splits.fingerprint,
        patients_fingerprint=fold.fingerprint,
        val_patients=fold.val,
        preprocess=cached.preprocess,
        val_ids=[cached.patient_ids[i] for i in val_idx],
        val_labels=cached.labels[val_idx],
    )


@dataclass(frozen=True, kw_only=True)
class Fold:
    """What `setup` builds for one fold; fixed while it trains (what changes is its FoldState)."""

    cfg: TrainConfig
    accelerator: Accelerator
    paths: RunPaths
    data: FoldData  # loaders prepared by the accelerator
    model: torch.nn.Module  # prepared (possibly DDP-wrapped)
    optimizer: AcceleratedOptimizer
    scheduler: LambdaLR  # stepped once per real optimizer update
    criterion: torch.nn.Module
    augment_gen: torch.Generator  # reseeded per epoch
    ema: ModelEma | None
    keeper: CheckpointKeeper  # best.pt and, with EMA, best_ema.pt
    trackers: list = field(default_factory=list)  # --report-to, started when the fold trains (fit)

    @property
    def folder(self) -> Path:
        return self.paths.fold(self.cfg.fold)


def resume_objects(fold: Fold, state: FoldState) -> dict[str, Stateful]:
    """The resume state, under the names state.pt has always used for them. A finished fold keeps
    only how it ended (epochs, metrics rows, the kept epochs): no epoch will train on, and its
    weights are in its checkpoints; the model, EMA and Adam's moments would be ~4x the weights
    written for nothing."""
    ended: dict[str, Stateful] = {"fold_state": state, **fold.keeper.bests}
    if state.finished:
        return ended
    objects: dict[str, Stateful] = {
        "model_state_dict": plain_module(fold.accelerator, fold.model),
        "optimizer": fold.optimizer,
        "scheduler": fold.scheduler,
        "rng": RngState(),
        **ended,
    }
    if fold.accelerator.scaler is not None:
        objects["scaler"] = fold.accelerator.scaler
    if fold.ema is not None:
        objects["ema_state_dict"] = fold.ema
    return objects


def plain_module(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain ResNet3D under DDP and torch.compile wrappers, in whatever order they were put
    on: what is saved, averaged and exported (its keys carry no `module.` or `_orig_mod.`)."""
    model = accelerator.unwrap_model(model, keep_torch_compile=False)
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = (
            model.module if hasattr(model, "module") and not hasattr(model, "_orig_mod") else model._orig_mod
        )
    return model


def train_fold(cfg: TrainConfig) -> dict:
    """Train fold `cfg.fold`; returns a summary (best epochs and AUCs, why it stopped)."""
    return train_folds([cfg])[0]


def check_cohort(cfg: TrainConfig) -> None:
    """Before anything slow (preparing a raw cohort, the accelerator, the model): the cohort
    can be split as asked (enough patients of each grade for the folds, the inner validation and
    the test set). A run whose splits.json exists is checked against it when its data is read."""
    if RunPaths(cfg.run).splits.exists():
        return
    if is_cache(cfg.data):
        cached = open_cache(cfg.data)
        ids, labels, groups = cached.patient_ids, cached.labels.tolist(), cached.collections
    else:
        cases = find_cases(cfg.data).cases
        check_trainable(cases, cfg.data)
        ids, labels = [c.patient_id for c in cases], [c.label for c in cases]
        groups = [c.collection or UNKNOWN for c in cases]
    make_splits(ids, labels, groups=groups, **split_spec(cfg))


def train_folds(cfgs: list[TrainConfig]) -> list[dict]:
    """Train the folds of `cfgs` (one run: settings equal but for the fold) one after the other
    in this process, under one Accelerator; returns their summaries.

    A cross-validation then pays the interpreter, torch and accelerate start-up once rather
    than once per fold. Each fold trains as it would in a process of its own: `setup` seeds it
    afresh, and the previous fold's prepared objects, accumulation counter, trackers and
    grad-scaler state are dropped before it starts (tested: fold k's metrics.csv and weights
    are the same alone or after other folds). With --resume a finished fold is skipped and a
    killed one continues, as with one launch per fold.
    """
    die_with_launcher()
    cfgs = [apply_effective_batch(cfg) for cfg in cfgs]
    cfg = cfgs[0]
    check_one_run(cfgs)
    refuse_inputs(cfg.run, {Path(cfg.data): "the training data (--data)"}, "--run")
    check_output_dir(cfg.run, "--run folder")  # before any work: one line if it cannot be written
    check_cohort(cfg)
    resolve_trackers(cfg.report_to)  # a tracker asked for and not installed: one line, now
    problem = pretrained_problem(cfg.pretrained, cfg.depth)  # offline: at once, not after retries
    if problem:
        raise BratsError(problem)
    precision, note = resolve_mixed_precision(cfg)
    accelerator = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        project_dir=cfg.run,
        # batches from pinned memory reach the GPU without the host waiting for it
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    summaries: list[dict] = []
    try:
        if note:
            log.info(note)
        if cfg.schedule_warning():
            log.warning(cfg.schedule_warning())
        for cfg in cfgs:
            if scaler is not None:  # fp16's loss scale as a new process starts with it
                accelerator.scaler.load_state_dict(scaler)
            try:
                fold = setup(cfg, accelerator)
                with sole_writer(fold):
                    state = resume_or_refuse(fold)
                    summaries.append(fit(fold, state))
            except BratsError as e:
                if len(cfgs) == 1:
                    raise
                left = [c.fold for c in cfgs[len(summaries) :]]
                raise BratsError(
                    f"fold {cfg.fold}: {e} (folds {', '.join(map(str, left))} not finished: "
                    "fix this, then rerun with --resume)"
                ) from e
            del fold, state
            release_fold(accelerator)
        return summaries
    finally:
        accelerator.end_training()  # also destroys the process group: the launcher exits cleanly


@contextmanager
def sole_writer(fold: Fold) -> Iterator[None]:
    """While the main process trains fold k, RUN/fold_K is locked: a second training of the same
    fold (a rerun while an orphan still writes, two `make cv` at once) is refused in one line."""
    if not fold.accelerator.is_main_process:
        yield
        return
    fold.folder.mkdir(parents=True, exist_ok=True)
    what = f"fold {fold.cfg.fold} of {fold.paths.root}"
    with exclusive_lock(fold.folder, what, "wait for that training to end, or stop it"):
        yield


def apply_effective_batch(cfg: TrainConfig) -> TrainConfig:
    """With --effective-batch, the per-process batch and accumulation that keep it."""
    if not cfg.effective_batch:
        return cfg
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch
    batch, accum = split_effective_batch(cfg.effective_batch, cfg.batch_size, processes)
    return dataclasses.replace(cfg, batch_size=batch, grad_accum=accum)


def release_fold(accelerator: Accelerator) -> None:
    """Forget a finished fold: its prepared model, optimizer and loaders (memory) and the
    accumulation counter (its tracker runs ended with it: the next fold logs to its own)."""
    accelerator.free_memory()


def setup(cfg: TrainConfig, accelerator: Accelerator) -> Fold:
    """Seed, data, model, optimizer, accelerator.prepare, scheduler, EMA, keepers, in that order."""
    set_seed(cfg.seed)
    if accelerator.device.type == "cpu":
        # `accelerate launch` exports OMP_NUM_THREADS=1, which halves CPU training on 2 cores:
        # share the cores among the processes instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    log.info(configure_backends(accelerator.device, cfg.deterministic))
    weights = None
    if cfg.pretrained:  # before the data: a missing download is one line, not a wait then an error
        with accelerator.main_process_first():  # one process downloads, the others read the cache
            weights = resolve_pretrained(cfg.pretrained, cfg.depth)
    paths = RunPaths(cfg.run)
    if accelerator.is_main_process:  # what a killed writer left behind
        for folder in (paths.root, paths.fold(cfg.fold)):
            remove_stale_temps(folder)
    data = load_data(cfg, accelerator, paths)

    model = build_model(cfg)
    if weights is not None:
        load_pretrained(model, weights)
    elif cfg.depth == 50:
        log.info(
            "ResNet-50 from scratch: the recipe starts from MedicalNet weights (RECIPE.md 1.4) "
            "(--pretrained medicalnet, or --pretrained PATH/resnet_50_23dataset.pth)"
        )
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(memory_format=memory_format(accelerator.device, cfg.channels_last))
    # Fused: one kernel over all parameters. The per-tensor loop took about a third of a ResNet-10
    # step at batch 4 on 2 CPU cores, 8x what the fused kernel takes (bench/RESULTS.md).
    fused = accelerator.device.type in ("cpu", "cuda") or None
    groups = param_groups(model, cfg.lr, cfg.classifier_lr_mult, cfg.weight_decay)
    optimizer = torch.optim.Adam(groups, fused=fused)
    criterion = make_criterion(cfg, data.class_counts)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, data.train_loader, data.val_loader
    )
    # Compiled around the DDP wrapper, not inside it: DDP keeps overlapping its gradient
    # communication with the backward pass, and the saved, averaged and exported weights are the
    # plain module's (plain_module unwraps the compiled wrapper, then DDP).
    model = maybe_compile(model, cfg.compile, cfg.compile_backend)
    data = dataclasses.replace(data, train_loader=train_loader, val_loader=val_loader)
    # Sized in optimizer updates of this process (the prepared loader is per process). Stepped by
    # hand after each real update rather than through accelerator.prepare, whose wrapper would
    # step it once per process.
    updates_per_epoch = math.ceil(len(data.train_loader) / cfg.grad_accum)
    total_updates = cfg.max_epochs * updates_per_epoch
    scheduler = LambdaLR(
        optimizer.optimizer, warmup_cosine(round(cfg.warmup * updates_per_epoch), total_updates)
    )
    ema = ModelEma(plain_module(accelerator, model), cfg.ema_decay) if cfg.ema_decay > 0 else None
    record = FoldRecord(
        config=cfg.to_dict(),
        fold=cfg.fold,
        splits_fingerprint=data.splits_fingerprint,
        patients_fingerprint=data.patients_fingerprint,
        protocol=protocol(cfg.inner_val, cfg.select),
        val_patients=data.val_patients,
        preprocess=data.preprocess,
        mixed_precision=VALIDATION_PRECISION,
        val_ids=data.val_ids,
        val_labels=data.val_labels,
    )
    return Fold(
        cfg=cfg,
        accelerator=accelerator,
        paths=paths,
        data=data,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=criterion.to(accelerator.device),
        augment_gen=torch.Generator(),
        ema=ema,
        keeper=CheckpointKeeper(paths=paths, record=record, select=cfg.select, ema=ema is not None),
    )


def resume_or_refuse(fold: Fold) -> FoldState:
    """With --resume, continue from state.pt when there is one; without it, refuse a fold
    folder that already holds training results. Returns where the fold starts."""
    cfg, paths, state = fold.cfg, fold.paths, FoldState()
    state_path = paths.state(cfg.fold)
    if cfg.resume and state_path.exists():
        extra = load_resume_state(state_path, resume_objects(fold, state))
        match_state_layout(fold.optimizer.optimizer)
        check_resume(extra, cfg, cfg.fold, fold.keeper.record.patients_fingerprint, state_path)
        best = fold.keeper.bests["best"]
        log.info(
            f"resumed {state_path} after epoch {state.epoch} "
            f"(best AUC {best.best_auc:.4f} at epoch {best.best_epoch})"
        )
    elif cfg.resume:
        log.info(f"--resume: no {state_path} yet, starting fold {cfg.fold} from scratch")
    elif any(p.exists() for p in (paths.best(cfg.fold), paths.best(cfg.fold, ema=True), state_path)):
        raise BratsError(
            f"{fold.folder} already holds a trained fold: "
            "pass --resume to continue it, or use a new --run folder"
        )
    if fold.accelerator.is_main_process:
        fold.folder.mkdir(parents=True, exist_ok=True)
        write_run_config(paths.root, cfg)
    return state


def fit(fold: Fold, state: FoldState) -> dict:
    """The epoch loop, until early stopping or --max-epochs; returns the fold's summary."""
    cfg, accelerator = fold.cfg, fold.accelerator
    if not state.finished:
        hparams = {k: v for k, v in cfg.to_dict().items() if isinstance(v, int | float | str | bool)}
        fold.trackers.extend(start_trackers(resolve_trackers(cfg.report_to), cfg.run, cfg.fold, hparams))
    try:
        for epoch in range(state.epoch + 1, cfg.max_epochs + 1):
            if state.finished:
                break
            run_epoch(fold, state, epoch)
            accelerator.wait_for_everyone()
    finally:
        finish_trackers(fold.trackers)
    if accelerator.is_main_process and state.finished:
        fold.keeper.plot()
    if state.stop_reason:
        log.info(f"fold {cfg.fold} finished after epoch {state.epoch}: {state.stop_reason}")
    return {
        "fold": cfg.fold,
        "epochs": state.epoch,
        **fold.keeper.outcome(),
        "stop_reason": state.stop_reason,
    }


def run_epoch(fold: Fold, state: FoldState, epoch: int) -> None:
    """Train, validate, let the keeper keep, decide on stopping, write the epoch's files."""
    cfg, accelerator = fold.cfg, fold.accelerator
    t0 = time.perf_counter()
    rank = accelerator.process_index
    torch.manual_seed(epoch_seed(cfg.seed, epoch, STREAM_DROPOUT, rank))
    fold.data.sample_gen.manual_seed(epoch_seed(cfg.seed, epoch, STREAM_SAMPLER))
    fold.augment_gen.manual_seed(epoch_seed(cfg.seed, epoch, STREAM_AUGMENT, rank))
    drw = apply_drw(fold.criterion, cfg, epoch, fold.data.class_counts)
    train_loss, samples_per_s = train_epoch(fold, epoch)

    # the raw model and, with EMA, its EMA copy, both scored under the training precision (what
    # the checkpoints record)
    candidates = [validate(fold, fold.model, ema=False)]
    if fold.ema is not None:
        share_ema_buffers(fold)
        candidates.append(validate(fold, fold.ema.module, ema=True))
    val = candidates[0].metrics
    row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"]}
    row.update({f"val_{m}": val[m] for m in METRICS})
    row["lr"] = fold.optimizer.param_groups[0]["lr"]
    row["classifier_lr"] = fold.optimizer.param_groups[1]["lr"]
    row["drw"] = int(drw)
    row["train_samples_per_s"] = round(samples_per_s, 2)
    if fold.ema is not None:
        row.update({f"ema_val_{m}": candidates[1].metrics[m] for m in ("auc", "f1", "accuracy")})
    row["seconds"] = round(time.perf_counter() - t0, 3)

    improved = fold.keeper.consider(epoch, candidates)
    state.record(epoch, row, improved, cfg, fold.keeper.policy.is_ema)
    if accelerator.is_main_process:
        write_epoch(fold, state, epoch)
    log_metrics(fold.trackers, {k: v for k, v in row.items() if k != "epoch"}, epoch)
    log.info(
        f"epoch {epoch}/{cfg.max_epochs} train_loss {train_loss:.4f} val_loss {val['loss']:.4f} "
        f"val_auc {val['auc']:.4f} f1 {val['f1']:.4f} acc {val['accuracy']:.4f} "
        f"lr {row['lr']:.2e} ({row['seconds']:.1f}s, train {samples_per_s:.1f} samples/s)"
    )


def share_ema_buffers(fold: Fold) -> None:
    """Under DDP each process's EMA copy averages its own BatchNorm statistics (each saw its own
    batches), while best_ema.pt is the main process's: every process validates the main
    process's EMA model, so that what is scored is what is saved."""
    if fold.accelerator.num_processes > 1:
        for buffer in fold.ema.module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def validate(fold: Fold, model: torch.nn.Module, ema: bool) -> Candidate:
    """`model` scored on the validation patients, in fp32 whatever the training precision: the
    validation set is small, and fp32 scores agree across devices, batch sizes and kernels to
    ~1e-4 per patient, where bf16 moves a patient's p(HGG) by up to 0.2 (evaluate.py re-scores and
    compares patient by patient)."""
    weights = model if ema else plain_module(fold.accelerator, model)
    with own_forward(weights) as fp32:  # the plain module: no DDP, compile or autocast wrapper
        logits, labels = predict(fp32, fold.data.val_loader, fold.accelerator, VALIDATION_PRECISION)
    metrics, p_hgg = score(logits, labels)
    return Candidate(ema=ema, weights=weights, metrics=metrics, p_hgg=p_hgg)


def write_epoch(fold: Fold, state: FoldState, epoch: int) -> None:
    """The main process's files after an epoch: the checkpoints the keeper keeps, metrics.csv and,
    when due, state.pt (the model, its EMA and Adam's moments: ~4x the weights; once the fold has
    finished, only how it ended). state.pt is written whenever a checkpoint is, so that it always
    knows the checkpoints on disk, and otherwise every --state-every seconds and at the end."""
    cfg = fold.cfg
    due = state.finished or time.monotonic() - state.state_written >= cfg.state_every
    written = fold.keeper.write(epoch, due)
    for path in written:
        log.info(f"epoch {epoch}: {'last epoch' if fold.keeper.last else 'new best'} -> {path}")
    write_csv_atomic(fold.paths.metrics(cfg.fold), state.history)
    if due or written:
        r = fold.keeper.record
        made_for = {"config": cfg.to_dict(), "fold": cfg.fold, "patients_fingerprint": r.patients_fingerprint}
        save_resume_state(fold.paths.state(cfg.fold), resume_objects(fold, state), made_for)
        write_json_atomic(fold.paths.status(cfg.fold), state.status())
        state.state_written = time.monotonic()


def train_epoch(fold: Fold, epoch: int) -> tuple[float, float]:
    """One pass over the training loader; returns the mean loss over every process and the
    training samples per second (all processes, validation excluded).

    Nothing is read back to the host per micro-batch: the loss sum and the first non-finite
    step stay on the device and are read at optimizer-update boundaries, where a non-finite
    loss on any process stops training before the update (TrainingError naming the epoch and
    step). The scheduler and the EMA follow real optimizer updates only: not micro-batches that
    accumulate, nor steps the fp16 grad scaler skipped.
    """
    cfg, accelerator, model = fold.cfg, fold.accelerator, fold.model
    model.train()
    fmt = memory_format(accelerator.device, cfg.channels_last)
    total = torch.zeros((), device=accelerator.device)
    # (first non-finite step or 0, its loss): read only at update boundaries
    first_bad = torch.zeros(2, device=accelerator.device)
    steps = samples = 0
    timer = FirstStepTimer(f"epoch {epoch}") if epoch == 1 else None
    bar = tqdm(
        fold.data.train_loader,
        desc=f"epoch {epoch}",
        leave=False,
        disable=not (cfg.progress and accelerator.is_local_main_process),
    )
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(bar, start=1):
        x = x.float()  # resident host batches arrive as float16
        if cfg.augment:
            x = augment_batch(x, fold.augment_gen)  # (B, C, D, H, W), on the training device
        # after augmentation, whose grid_sample returns a contiguous tensor
        x = x.contiguous(memory_format=fmt)
        with accelerator.accumulate(model):
            loss = fold.criterion(model(x).float(), y)
            new_bad = (first_bad[0] == 0) & ~torch.isfinite(loss.detach())
            here = torch.stack([torch.full_like(loss.detach(), step), loss.detach()])
            first_bad = torch.where(new_bad, here, first_bad)
            if accelerator.sync_gradients:
                check_finite(accelerator, first_bad, epoch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scale = loss_scale(accelerator) if accelerator.sync_gradients else None
            fold.optimizer.step()
            updated = accelerator.sync_gradients and not update_skipped(accelerator, scale)
            if updated:
                fold.scheduler.step()
            fold.optimizer.zero_grad(set_to_none=True)
        if updated and fold.ema is not None:
            fold.ema.update(plain_module(accelerator, model))
        if timer is not None:
            timer.step()
        total += loss.detach()
        steps += 1
        samples += len(y)
    bar.close()
    mean = total / max(steps, 1)
    if accelerator.num_processes > 1:
        mean = accelerator.reduce(mean, "mean")
    mean_loss = float(mean.item())  # waits for the device: the time below is the real one
    seconds = time.perf_counter() - t0
    return mean_loss, samples * accelerator.num_processes / max(seconds, 1e-9)


def loss_scale(accelerator: Accelerator) -> float | None:
    """The fp16 grad scaler's scale before an update (None without one: bf16 and fp32 need none).
    Read once per optimizer update, where the loop reads the host anyway."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else None


def update_skipped(accelerator: Accelerator, scale_before: float | None) -> bool:
    """Whether the grad scaler skipped this update (gradients overflowed in fp16). With a fused
    optimizer the scaler always calls step() (the kernel skips on overflow itself), so
    Accelerate never reports the skip; the scale, halved on every overflow, does."""
    if accelerator.optimizer_step_was_skipped:
        return True
    return scale_before is not None and accelerator.scaler.get_scale() < scale_before


def check_finite(accelerator: Accelerator, first_bad: torch.Tensor, epoch: int) -> None:
    """Raise (on every process alike) when any process met a non-finite loss since the epoch began."""
    bad = first_bad
    if accelerator.num_processes > 1:  # every process must raise alike: report the first bad one
        everyone = accelerator.gather(first_bad[None])  # (P, 2)
        hit = (everyone[:, 0] > 0).nonzero()
        bad = everyone[hit[0, 0]] if len(hit) else first_bad
    step, value = bad.tolist()
    if step:
        raise TrainingError(
            f"loss is {value} at epoch {epoch}, step {int(step)}: training stopped, "
            "the best checkpoint is untouched (lower --lr, or check the inputs)"
        )
