"""Training configuration: one frozen dataclass, the two policies of RECIPE.md.

`final` (the default) is the training report's final policy (RECIPE.md 6); `baseline` is its
first setup (RECIPE.md 1), kept reproducible so that the two can be compared on the same folds
(`make ablation`).
Every default cites where it comes from ("RECIPE.md 6.3": section 6.3 of RECIPE.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from brats.data.cohort import MODALITIES
from brats.errors import BratsError

POLICIES = ("final", "baseline")
DEPTHS = (10, 18, 34, 50)
LAYOUTS = ("strided", "medicalnet")
SELECT = ("best", "last")  # which epoch of a fold is kept and scored
LOSSES = ("ce", "ldam")
SAMPLERS = ("inverse_freq", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
CACHE_DEVICES = ("auto", "cuda", "cpu", "off")
GROUP_BY = ("collection",)  # what --group-by keeps together (brats.data.cohort.collection_of)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # eager backends trace but generate no code


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train on
    data: str = ""  # prepared cache, or a raw cohort root (prepared first into <root>_cache<size>)
    run: str = "runs/cv"  # run folder: splits.json, config.json, fold_K/
    fold: int = 0  # 0-based fold index trained by this process
    folds: int = 5  # K of the stratified K-fold (seed: 5-fold CV)
    split_seed: int = 42  # seed of the fold assignment, shared by every policy
    inner_val: float = 0.0  # >0: this fraction of the training patients chooses the epoch (unbiased)
    test_fraction: float = 0.0  # >0: a stratified test set held out of every fold (scores the ensemble)
    group_by: str | None = None  # "collection": each data collection in one validation fold
    select: str = "best"  # best: the epoch of the best val AUC (RECIPE.md 6.6); last: each fold's last epoch
    size: int = 128  # cube side when `data` is raw (RECIPE.md 6.2: 128^3)
    # --- model
    depth: int = 50  # ResNet depth (seed: ResNet50-3D)
    layout: str = "strided"  # strided: stride 2 in layers 2-4 (~116 GFLOP); medicalnet: dilated (~450)
    modalities: tuple[str, ...] = MODALITIES  # channels (RECIPE.md 6.2: T1, T1ce, T2, FLAIR early fusion)
    dropout: float = 0.4  # before the classifier (RECIPE.md 6.4)
    pretrained: str | None = None  # MedicalNet .pth or "medicalnet" (seed: MedicalNet-pretrained)
    sync_bn: bool = False  # SyncBatchNorm under DDP (off: see engine.py)
    # --- optimisation
    policy: str = "final"  # preset these defaults come from
    max_epochs: int = 60  # upper bound; early stopping ends most runs (RECIPE.md, choices)
    min_epochs: int = 15  # no early stop before this epoch (RECIPE.md 6.4)
    patience: int = 10  # epochs without a new best val AUC before stopping (RECIPE.md 6.4)
    batch_size: int = 4  # per process (RECIPE.md 6.3)
    grad_accum: int = 2  # micro-batches per optimizer update (RECIPE.md 6.3: effective batch 8)
    lr: float = 1e-4  # backbone learning rate, Adam (RECIPE.md 6.3)
    classifier_lr_mult: float = 2.0  # classifier lr = lr x this (RECIPE.md 3.4.1: 10x -> 2x)
    weight_decay: float = 1e-4  # Adam L2 penalty (RECIPE.md 6.4)
    warmup_epochs: float = 3.0  # linear warm-up then cosine, sized in optimizer updates (RECIPE.md 6.3: 3-5)
    warmup_fraction: float = 0.0  # >0: warm-up = this fraction of --max-epochs instead (RECIPE.md 1.3: 10%)
    max_grad_norm: float = 0.0  # gradient clipping; 0 = off (the report does not clip)
    loss: str = "ce"  # ce = nn.CrossEntropyLoss (RECIPE.md 6.1); ldam (RECIPE.md 1.2)
    ldam_max_m: float = 0.2  # LDAM largest margin (RECIPE.md 1.2)
    ldam_s: float = 15.0  # LDAM logit scale (RECIPE.md 1.2)
    drw_start_epoch: int = 0  # deferred re-weighting from this epoch (1-based); 0 = off (RECIPE.md 6.1)
    sampler: str = "inverse_freq"  # WeightedRandomSampler, inverse class frequency (RECIPE.md 6.1)
    augment: bool = True  # shared spatial + per-channel intensity augmentation (RECIPE.md 6.2)
    ema_decay: float = 0.0  # 0 = off (RECIPE.md 6.5 default); 0.995 when enabled (RECIPE.md 3.4.4)
    mixed_precision: str | None = (
        None  # None = from accelerate config; CPU falls back to fp32 (RECIPE.md 6.3: AMP)
    )
    # --- run control
    seed: int = 42  # torch seed for init, sampling, augmentation and dropout
    state_every: float = 0.0  # seconds between state.pt writes, 0: every epoch (a new best always writes)
    workers: int = 2  # DataLoader worker processes (--cache-device off only)
    cache_device: str = "auto"  # fold volumes resident: auto (GPU if they fit, else host), cuda, cpu, off
    val_batch_size: int = 0  # validation batch; 0 = 2 x batch_size (no gradients: larger fits)
    channels_last: bool = True  # channels_last_3d on a GPU (faster cuDNN kernels: bench/RESULTS.md, GPU)
    compile: bool = False  # torch.compile: a one-off compile, then faster steps (bench/RESULTS.md, GPU)
    compile_backend: str = "inductor"  # torch.compile backend: inductor (code generation) or aot_eager
    deterministic: bool = False  # cuDNN deterministic kernels on a GPU (the CPU always is)
    effective_batch: int = 0  # >0: batch x accumulation x processes kept at this (RECIPE.md 6.3: 8)
    cpu: bool = False  # force the CPU (also for `accelerate launch --multi_gpu` gloo tests)
    resume: bool = False  # continue after the last completed epoch of RUN/fold_K/state.pt
    progress: bool = True  # progress bar on the main process
    report_to: str = (
        "auto"  # trackers: auto (TensorBoard if installed), all, none, or tensorboard,mlflow,wandb
    )
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run

    @property
    def warmup(self) -> float:
        """Warm-up length in epochs."""
        return self.warmup_fraction * self.max_epochs if self.warmup_fraction > 0 else self.warmup_epochs

    def schedule_warning(self) -> str | None:
        """A schedule that never leaves its warm-up, said plainly (the run still trains)."""
        if self.warmup >= self.max_epochs:
            return (
                f"--max-epochs {self.max_epochs} is not longer than the {self.warmup:g} warm-up epochs: the "
                "learning rate never reaches its peak and never decays (lower --warmup-epochs)"
            )
        return None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "modalities" in kwargs:
            kwargs["modalities"] = tuple(kwargs["modalities"])
        return cls(**kwargs)


# RECIPE.md 1: FLAIR only, LDAM (max_m 0.2, s 15) + DRW from epoch 25 + the sampler kept,
# classifier lr 10x, batch 2 (effective 4), warm-up 10% of the epochs, patience 7 after 10.
BASELINE = {
    "modalities": ("flair",),
    "loss": "ldam",
    "drw_start_epoch": 25,
    "classifier_lr_mult": 10.0,
    "batch_size": 2,
    "grad_accum": 2,
    "warmup_fraction": 0.1,  # 10% of the epochs
    "patience": 7,
    "min_epochs": 10,
}


def make_config(policy: str = "final", **overrides: Any) -> TrainConfig:
    """The policy's defaults with `overrides` (None values are ignored), validated."""
    if policy not in POLICIES:
        raise BratsError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    base = dict(BASELINE) if policy == "baseline" else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("pretrained") and overrides.get("layout") is None:
        base["layout"] = "medicalnet"  # the layout MedicalNet's weights were trained in
    if overrides.get("warmup_epochs") is not None and overrides.get("warmup_fraction") is None:
        base["warmup_fraction"] = 0.0  # an explicit --warmup-epochs wins over the policy's fraction
    cfg = TrainConfig(policy=policy, **base)
    validate(cfg)
    return cfg


def split_spec(cfg: TrainConfig) -> dict[str, Any]:
    """The settings the run's splits are made with (brats.data.folds.load_or_make_splits)."""
    return {
        "k": cfg.folds,
        "seed": cfg.split_seed,
        "inner_val": cfg.inner_val,
        "test_fraction": cfg.test_fraction,
        "group_by": cfg.group_by,
    }


def validate(cfg: TrainConfig) -> None:
    """Collect every problem, raise once with all of them."""
    problems = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    check(cfg.depth in DEPTHS, f"--depth {cfg.depth}: choose one of {DEPTHS}")
    check(cfg.layout in LAYOUTS, f"--layout {cfg.layout!r}: choose one of {LAYOUTS}")
    check(cfg.loss in LOSSES, f"--loss {cfg.loss!r}: choose one of {LOSSES}")
    check(cfg.sampler in SAMPLERS, f"--sampler {cfg.sampler!r}: choose one of {SAMPLERS}")
    check(
        cfg.mixed_precision is None or cfg.mixed_precision in MIXED_PRECISION,
        f"--mixed-precision {cfg.mixed_precision!r}: choose one of {MIXED_PRECISION}",
    )
    check(cfg.folds >= 2, f"--k-folds {cfg.folds}: need at least 2")
    check(0 <= cfg.fold < cfg.folds, f"--fold {cfg.fold}: must be in 0..{cfg.folds - 1}")
    check(cfg.select in SELECT, f"--select {cfg.select!r}: choose one of {SELECT}")
    check(0.0 <= cfg.inner_val < 0.5, f"--inner-val {cfg.inner_val}: use 0 (off) or a fraction below 0.5")
    check(
        0.0 <= cfg.test_fraction < 0.5,
        f"--test-fraction {cfg.test_fraction}: use 0 (off) or a fraction below 0.5",
    )
    check(cfg.group_by in (None, *GROUP_BY), f"--group-by {cfg.group_by!r}: choose {' or '.join(GROUP_BY)}")
    check(cfg.size >= 16, f"--size {cfg.size}: at least 16 voxels")
    check(
        len(cfg.modalities) > 0 and all(m in MODALITIES for m in cfg.modalities),
        f"modalities {cfg.modalities}: each must be one of {MODALITIES}",
    )
    check(len(set(cfg.modalities)) == len(cfg.modalities), f"modalities {cfg.modalities}: repeated channel")
    check(0.0 <= cfg.dropout < 1.0, f"--dropout {cfg.dropout}: must be in [0, 1)")
    check(cfg.max_epochs >= 1, f"--max-epochs {cfg.max_epochs}: at least 1")
    check(cfg.min_epochs >= 0, f"--min-epochs {cfg.min_epochs}: must be >= 0")
    check(cfg.patience >= 1, f"--patience {cfg.patience}: at least 1")
    check(cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: at least 1")
    check(cfg.grad_accum >= 1, f"--grad-accum {cfg.grad_accum}: at least 1")
    # above ~1e38 Adam's float32 state overflows with a traceback; NaN and inf fail here too
    check(0 < cfg.lr <= 1e30, f"--lr {cfg.lr}: must be > 0 and at most 1e30 (the recipe uses 1e-4)")
    check(cfg.classifier_lr_mult > 0, f"--classifier-lr-mult {cfg.classifier_lr_mult}: must be > 0")
    check(
        0 <= cfg.weight_decay <= 1,
        f"--weight-decay {cfg.weight_decay}: a number from 0 to 1 (the recipe: 1e-4)",
    )
    for name in ("seed", "split_seed"):  # numpy and scikit-learn take seeds in [0, 2^32)
        value = getattr(cfg, name)
        check(
            0 <= value < 2**32, f"--{name.replace('_', '-')} {value}: give a whole number from 0 to 2^32 - 1"
        )
    check(cfg.warmup_epochs >= 0, f"--warmup-epochs {cfg.warmup_epochs}: must be >= 0")
    check(0 <= cfg.warmup_fraction < 1, f"--warmup-fraction {cfg.warmup_fraction}: must be in [0, 1)")
    check(cfg.max_grad_norm >= 0, f"--max-grad-norm {cfg.max_grad_norm}: must be >= 0 (0 = off)")
    check(0.0 <= cfg.ema_decay < 1.0, f"--ema-decay {cfg.ema_decay}: use 0 (off) or a value in (0, 1)")
    check(cfg.ldam_max_m > 0 and cfg.ldam_s > 0, "LDAM max_m and s must be > 0")
    check(cfg.drw_start_epoch >= 0, f"--drw-start-epoch {cfg.drw_start_epoch}: must be >= 0 (0 = off)")
    check(cfg.workers >= 0, f"--workers {cfg.workers}: must be >= 0")
    check(cfg.state_every >= 0, f"--state-every {cfg.state_every}: seconds, must be >= 0")
    check(cfg.cache_device in CACHE_DEVICES, f"--cache-device {cfg.cache_device!r}: one of {CACHE_DEVICES}")
    check(
        cfg.compile_backend in COMPILE_BACKENDS,
        f"--compile-backend {cfg.compile_backend!r}: one of {COMPILE_BACKENDS}",
    )
    check(cfg.val_batch_size >= 0, f"--val-batch-size {cfg.val_batch_size}: must be >= 0 (0 = 2 x batch)")
    check(cfg.effective_batch >= 0, f"--effective-batch {cfg.effective_batch}: must be >= 0 (0 = off)")
    check(bool(cfg.data), "--data is required: a prepared cache or a BraTS folder")
    if problems:
        raise BratsError("invalid configuration: " + "; ".join(problems))
