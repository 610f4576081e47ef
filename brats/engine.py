"""Training of one cross-validation fold on Hugging Face Accelerate.

Order: seed -> data -> model -> optimizer -> accelerator.prepare -> scheduler (sized in optimizer
updates) -> optional resume -> epochs. Each epoch: train, validate (raw and EMA), write
metrics.csv, keep best.pt / best_ema.pt on a strict val-AUC improvement, write the resume state.

Exact resume: every random stream (dropout, sampler, augmentation) is reseeded from
(seed, epoch, stream) at the start of each epoch, and the resume state holds the model,
optimizer, scheduler, grad scaler, EMA, best metrics and the early-stopping counter. A run killed
at any moment and resumed repeats at most the epoch it was in, with the same numbers.

BatchNorm under DDP: plain per-process BatchNorm by default (`--sync-bn` converts to
SyncBatchNorm). With the seed's batch of 4 per process, each GPU normalises over the same
4-sample batches that a single-GPU run sees, so N GPUs reproduce the single-GPU recipe with N x
the throughput; SyncBatchNorm would add a collective per BN layer (53 in ResNet-50).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from brats import __version__
from brats.atomic import write_csv_atomic, write_json_atomic
from brats.augment import augment_batch
from brats.cache import open_data
from brats.checkpoint import save_atomic
from brats.config import TrainConfig, comparable
from brats.data import CachedVolumes, make_sampler
from brats.ema import ModelEma
from brats.errors import BratsError
from brats.folds import load_or_make_splits, protocol
from brats.losses import apply_drw, make_criterion
from brats.metrics import METRICS, classification_metrics, save_plots
from brats.model import build_model, load_pretrained, param_groups
from brats.runs import RunPaths

log = get_logger(__name__)

STREAM_DROPOUT, STREAM_SAMPLER, STREAM_AUGMENT = 0, 1, 2
# A new best must beat the old one by more than float noise: the same ranking can give AUCs that
# differ in the last bits, which must not count as an improvement.
AUC_EPS = 1e-9


class TrainingError(BratsError):
    pass


@dataclass
class FoldState:
    """What a resumed run needs beyond the weights; saved in state.pt."""

    epoch: int = 0  # completed epochs (1-based numbering of the last one)
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_ema_auc: float = -math.inf
    best_ema_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last new best (raw or EMA)
    finished: bool = False
    stop_reason: str = ""
    history: list[dict] = field(default_factory=list)


def epoch_seed(seed: int, epoch: int, stream: int, process: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 1009 + stream * 101 + process) % (2**63)


def resolve_mixed_precision(cfg: TrainConfig) -> tuple[str, str | None]:
    """bf16/fp16 from the flag or the accelerate config; fp32 on a CPU (with the reason)."""
    requested = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    on_gpu = torch.cuda.is_available() and not cfg.cpu
    if requested != "no" and not on_gpu:
        return "no", f"mixed precision {requested} requested but training on the CPU: using fp32"
    return requested, None


def warmup_cosine(warmup: int, total: int):
    """lr multiplier per optimizer update: linear warm-up to 1, then cosine to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def predict(
    model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 2) float32 and labels (N,) over a loader, in eval mode without gradients.

    With an accelerator (prepared loader), batches are gathered from every process without the
    duplicates that even batches add; without one, batches go to the model's device.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for x, y in loader:
        if accelerator is None:
            x, y = x.to(device), y.to(device)
        out = model(x).float()
        if accelerator is not None:
            out, y = accelerator.gather_for_metrics((out, y))
        logits.append(out.cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def score(logits: np.ndarray, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """Metrics (val_loss = cross-entropy for every policy, so policies compare) and p(HGG)."""
    t = torch.from_numpy(logits).double()
    p_hgg = torch.softmax(t, dim=1)[:, 1].numpy()
    metrics = classification_metrics(labels, p_hgg)
    metrics["loss"] = float(F.cross_entropy(t, torch.from_numpy(labels).long()))
    return metrics, p_hgg


def write_run_config(run: Path, cfg: TrainConfig) -> None:
    """RUN/config.json: the resolved config; every fold of a run must share it."""
    path = RunPaths(run).config
    d = cfg.to_dict()
    if path.exists():
        # Fields added by a later brats version take their defaults, so an older run still matches.
        old = TrainConfig.from_dict(json.loads(path.read_text())).to_dict()
        diff = sorted(k for k in set(comparable(old)) | set(comparable(d)) if old.get(k) != d.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {d.get(k)!r}" for k in diff[:4])
            raise BratsError(
                f"{path}: this run was started with other settings ({shown}); "
                "use a new --run folder so that the folds of one run stay comparable"
            )
        return
    write_json_atomic(path, d)


def replace_plots(
    fold_dir: Path, prefix: str, epoch: int, labels: np.ndarray, p_hgg: np.ndarray, title: str
) -> None:
    """Plots of the new best epoch; the previous best's plots are removed."""
    for old in fold_dir.glob(f"{prefix}*_epoch_*.png"):
        if prefix or not old.name.startswith("ema_"):
            old.unlink()
    save_plots(fold_dir, labels, p_hgg, prefix=prefix, suffix=f"_epoch_{epoch}", title=title)


def train_fold(cfg: TrainConfig) -> dict:
    """Train fold `cfg.fold`; returns a summary (best epochs and AUCs, why it stopped)."""
    precision, note = resolve_mixed_precision(cfg)
    log_with = "tensorboard" if _has_tensorboard() else None
    accelerator = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=log_with,
        project_dir=cfg.run,
    )
    try:
        if note:
            log.info(note)
        return _train(cfg, accelerator)
    finally:
        accelerator.end_training()  # also destroys the process group: the launcher exits cleanly


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _train(cfg: TrainConfig, accelerator: Accelerator) -> dict:
    set_seed(cfg.seed)
    if accelerator.device.type == "cpu":
        # `accelerate launch` exports OMP_NUM_THREADS=1, which halves CPU training on 2 cores:
        # share the cores among the processes instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    run = Path(cfg.run)
    paths = RunPaths(run)
    fold_dir = paths.fold(cfg.fold)
    main = accelerator.is_main_process

    # --- data: the main process prepares the cache and writes the splits first
    with accelerator.main_process_first():
        cached = open_data(cfg.data, cfg.size)
        ids, labels = cached.patient_ids, cached.labels.tolist()
        splits = load_or_make_splits(paths.splits, ids, labels, cfg.folds, cfg.split_seed, cfg.inner_val)
        if main:
            write_run_config(run, cfg)
    fold = splits.fold(cfg.fold, ids, labels)
    train_ds = CachedVolumes(cached, cached.indices(fold.train), cfg.modalities)
    val_ds = CachedVolumes(cached, cached.indices(fold.val), cfg.modalities)
    class_counts = np.bincount(train_ds.labels, minlength=2).tolist()
    log.info(
        f"fold {cfg.fold}: {len(train_ds)} train ({class_counts[1]} HGG, {class_counts[0]} LGG), "
        f"{len(val_ds)} val; {protocol(splits.inner_val)}; "
        f"policy {cfg.policy}; channels {','.join(cfg.modalities)}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}"
    )
    sample_gen, augment_gen = torch.Generator(), torch.Generator()
    sampler = make_sampler(cfg.sampler, train_ds.labels, sample_gen)
    pin = accelerator.device.type == "cuda"
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=pin,
        drop_last=len(train_ds) > cfg.batch_size,  # a batch of 1 breaks BatchNorm at 1^3 feature maps
    )
    val_loader = DataLoader(
        val_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers, pin_memory=pin
    )

    # --- model, optimizer
    model = build_model(cfg)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(param_groups(model, cfg.lr, cfg.classifier_lr_mult, cfg.weight_decay))
    criterion = make_criterion(cfg, class_counts)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader
    )
    criterion = criterion.to(accelerator.device)

    # Sized in optimizer updates of this process (the prepared loader is per process). Stepped by
    # hand after each real update rather than through accelerator.prepare, whose wrapper would
    # step it once per process.
    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_updates = cfg.max_epochs * updates_per_epoch
    scheduler = LambdaLR(
        optimizer.optimizer, warmup_cosine(round(cfg.warmup * updates_per_epoch), total_updates)
    )
    ema = ModelEma(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay > 0 else None

    # --- resume
    state = FoldState()
    state_path = paths.state(cfg.fold)
    if cfg.resume and state_path.exists():
        state = _load_state(state_path, accelerator, model, optimizer, scheduler, ema)
        log.info(
            f"resumed {state_path} after epoch {state.epoch} "
            f"(best AUC {state.best_auc:.4f} at epoch {state.best_epoch})"
        )
    elif cfg.resume:
        log.info(f"--resume: no {state_path} yet, starting fold {cfg.fold} from scratch")
    elif any(p.exists() for p in (paths.best(cfg.fold), paths.best(cfg.fold, ema=True), state_path)):
        raise BratsError(
            f"{fold_dir} already holds a trained fold: "
            "pass --resume to continue it, or use a new --run folder"
        )
    if main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.log_with:
        accelerator.init_trackers(
            paths.fold(cfg.fold).name,
            config={k: v for k, v in cfg.to_dict().items() if isinstance(v, int | float | str | bool)},
        )

    payload_base = {
        "config": cfg.to_dict(),
        "fold": cfg.fold,
        "splits_fingerprint": splits.fingerprint,
        "protocol": protocol(splits.inner_val),
        "val_patients": fold.val,
        "preprocess": cached.preprocess,
        "brats_version": __version__,
    }

    # --- epochs
    for epoch in range(state.epoch + 1, cfg.max_epochs + 1):
        if state.finished:
            break
        t0 = time.perf_counter()
        rank = accelerator.process_index
        torch.manual_seed(epoch_seed(cfg.seed, epoch, STREAM_DROPOUT, rank))
        sample_gen.manual_seed(epoch_seed(cfg.seed, epoch, STREAM_SAMPLER))
        augment_gen.manual_seed(epoch_seed(cfg.seed, epoch, STREAM_AUGMENT, rank))
        drw = apply_drw(criterion, cfg, epoch, class_counts)

        train_loss = _train_epoch(
            cfg, accelerator, model, optimizer, scheduler, criterion, train_loader, augment_gen, ema, epoch
        )

        logits, val_labels = predict(model, val_loader, accelerator)
        val, p_hgg = score(logits, val_labels)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"]}
        row.update({f"val_{m}": val[m] for m in METRICS})
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["classifier_lr"] = optimizer.param_groups[1]["lr"]
        row["drw"] = int(drw)
        improved = val["auc"] > state.best_auc + AUC_EPS  # strict; NaN never improves
        ema_improved = False
        if ema is not None:
            ema_logits, _ = predict(ema.module, val_loader, accelerator)
            ema_val, ema_p = score(ema_logits, val_labels)
            row.update({f"ema_val_{m}": ema_val[m] for m in ("auc", "f1", "accuracy")})
            ema_improved = ema_val["auc"] > state.best_ema_auc + AUC_EPS
        row["seconds"] = round(time.perf_counter() - t0, 3)

        if improved:
            state.best_auc, state.best_epoch = val["auc"], epoch
        if ema_improved:
            state.best_ema_auc, state.best_ema_epoch = ema_val["auc"], epoch
        state.bad_epochs = 0 if (improved or ema_improved) else state.bad_epochs + 1
        state.epoch = epoch
        state.history.append(row)
        if epoch >= cfg.min_epochs and state.bad_epochs >= cfg.patience:
            state.finished, state.stop_reason = (
                True,
                f"early stop: no new best val AUC for {cfg.patience} epochs",
            )
        elif epoch == cfg.max_epochs:
            state.finished, state.stop_reason = True, f"reached --max-epochs {cfg.max_epochs}"

        if main:
            if improved:
                path = paths.best(cfg.fold)
                save_atomic(
                    {
                        **payload_base,
                        "model_state_dict": _cpu_state(accelerator.unwrap_model(model)),
                        "epoch": epoch,
                        "val_metrics": val,
                        "is_ema": False,
                    },
                    path,
                )
                replace_plots(fold_dir, "", epoch, val_labels, p_hgg, f"fold {cfg.fold} epoch {epoch}")
                log.info(f"epoch {epoch}: new best val AUC {val['auc']:.4f} -> {path}")
            if ema_improved:
                path = paths.best(cfg.fold, ema=True)
                save_atomic(
                    {
                        **payload_base,
                        "model_state_dict": _cpu_state(ema.module),
                        "epoch": epoch,
                        "val_metrics": ema_val,
                        "is_ema": True,
                    },
                    path,
                )
                replace_plots(
                    fold_dir, "ema_", epoch, val_labels, ema_p, f"fold {cfg.fold} EMA epoch {epoch}"
                )
                log.info(f"epoch {epoch}: new best EMA val AUC {ema_val['auc']:.4f} -> {path}")
            write_csv_atomic(paths.metrics(cfg.fold), state.history)
            _save_state(state_path, state, accelerator, model, optimizer, scheduler, ema, cfg)
        accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        log.info(
            f"epoch {epoch}/{cfg.max_epochs} train_loss {train_loss:.4f} val_loss {val['loss']:.4f} "
            f"val_auc {val['auc']:.4f} f1 {val['f1']:.4f} acc {val['accuracy']:.4f} "
            f"lr {row['lr']:.2e} ({row['seconds']:.1f}s)"
        )
        accelerator.wait_for_everyone()

    if state.stop_reason:
        log.info(f"fold {cfg.fold} finished after epoch {state.epoch}: {state.stop_reason}")
    return {
        "fold": cfg.fold,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "best_auc": state.best_auc,
        "best_ema_epoch": state.best_ema_epoch if ema is not None else None,
        "best_ema_auc": state.best_ema_auc if ema is not None else None,
        "stop_reason": state.stop_reason,
    }


def _train_epoch(
    cfg, accelerator, model, optimizer, scheduler, criterion, loader, augment_gen, ema, epoch
) -> float:
    model.train()
    total = torch.zeros((), device=accelerator.device)
    steps = 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}",
        leave=False,
        disable=not (cfg.progress and accelerator.is_local_main_process),
    )
    for step, (x, y) in enumerate(bar, start=1):
        if cfg.augment:
            x = augment_batch(x, augment_gen)  # (B, C, D, H, W), on the training device
        with accelerator.accumulate(model):
            loss = criterion(model(x).float(), y)
            bad = (~torch.isfinite(loss.detach())).float()
            if accelerator.num_processes > 1:
                bad = accelerator.reduce(bad, "sum")
            if bad.item():
                raise TrainingError(
                    f"loss is {loss.item()} at epoch {epoch}, step {step}: training stopped, "
                    "the best checkpoint is untouched (lower --lr, or check the inputs)"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients and ema is not None:
            ema.update(accelerator.unwrap_model(model))
        total += loss.detach()
        steps += 1
    bar.close()
    mean = total / max(steps, 1)
    return (
        float(accelerator.reduce(mean, "mean").item())
        if accelerator.num_processes > 1
        else float(mean.item())
    )


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save_state(path, state, accelerator, model, optimizer, scheduler, ema, cfg) -> None:
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    save_atomic(
        {
            "model_state_dict": _cpu_state(accelerator.unwrap_model(model)),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler,
            "ema_state_dict": _cpu_state(ema.module) if ema is not None else None,
            "fold_state": asdict(state),
            # Numpy's and Python's generators are not used in training; torch's are reseeded
            # per epoch and saved too.
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": cfg.to_dict(),
        },
        path,
    )


def _load_state(path, accelerator, model, optimizer, scheduler, ema) -> FoldState:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BratsError(
            f"{path}: cannot read the resume state ({type(e).__name__}: {e}); delete it to start over"
        ) from e
    accelerator.unwrap_model(model).load_state_dict(blob["model_state_dict"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if blob["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(blob["scaler"])
    if ema is not None:
        if blob["ema_state_dict"] is None:
            raise BratsError(
                f"{path}: saved without EMA but --ema-decay is set now; resume with the same settings"
            )
        ema.load_state_dict(blob["ema_state_dict"])
    torch.set_rng_state(blob["rng_cpu"])
    if blob["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    return FoldState(**blob["fold_state"])
