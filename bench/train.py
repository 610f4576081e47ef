"""Training-step and input-pipeline throughput, measured side by side in one run.

- step: forward + backward + Adam step of the ResNet on random (B, C, S, S, S) input, samples/s
  (optionally channels_last_3d and/or torch.compile, whose one-off compile time is printed);
- input pipeline, both paths: `loader` (memory-mapped float16 files -> DataLoader workers ->
  float32 -> pinned -> device, `--cache-device off`) and `resident` (one float16 tensor on the
  device -> index gather -> float32, the default), each followed by the augmentation on the
  training device, samples/s, and its ratio to the step (goal >= 10x: the model never waits).
- achieved TFLOP/s of the step, FLOPs counted by torch.utils.flop_counter.

    python bench/train.py                                   # CPU: depth 50 at 64^3 and 128^3
    python bench/train.py --device cuda --precision bf16 --channels-last --compile --sizes 128 --batch 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from brats.data.cache_reader import CachedCohort
from brats.data.cohort import MODALITIES
from brats.models.resnet import ResNet3D
from brats.training.augment import augment_batch
from brats.training.datasets import CachedVolumes, ResidentVolumes, resident_loader


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_steps(model, opt, x, y, steps: int, precision: str, device: torch.device) -> float:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (cudnn autotune, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pipeline(
    cached: CachedCohort, batch: int, batches: int, device: torch.device, workers: int, resident: bool
) -> float:
    indices = list(range(len(cached)))
    if resident:
        ds = ResidentVolumes(cached, indices, MODALITIES, device, pin=device.type == "cuda")
        loader = resident_loader(ds, batch, torch.utils.data.RandomSampler(ds), drop_last=True)
    else:
        loader = DataLoader(
            CachedVolumes(cached, indices, MODALITIES),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=workers > 0,
        )
    gen = torch.Generator().manual_seed(0)  # augmentation draws on the CPU whatever the device
    it = iter(loader)
    next(it)  # start the workers
    sync(device)
    t0 = time.perf_counter()
    n = 0
    while n < batches:
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        x = x.to(device, non_blocking=True).float()
        augment_batch(x, gen)
        n += 1
    sync(device)
    return time.perf_counter() - t0


def fake_cache(root: Path, n: int, size: int) -> CachedCohort:
    """n float16 volumes on disk, memory-mapped like a prepared cache."""
    rng = np.random.default_rng(0)
    volumes = []
    for i in range(n):
        v = rng.standard_normal((4, size, size, size), dtype=np.float32).astype(np.float16)
        np.save(root / f"{i}.npy", v)
        volumes.append(np.load(root / f"{i}.npy", mmap_mode="r"))
    return CachedCohort(
        root=root,
        patient_ids=[str(i) for i in range(n)],
        labels=np.arange(n) % 2,
        volumes=volumes,
        preprocess={"modalities": list(MODALITIES), "size": size},
        files=[root / f"{i}.npy" for i in range(n)],
        checksums=[None] * n,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--layout", default="strided")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--cohort", type=int, default=0, help="volumes in the fake cache [max(2 x batch, 8)]")
    ap.add_argument("--json", help="also write the figures of the last size to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(
        f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
        f"torch {torch.__version__}, "
        f"ResNet-{args.depth} {args.layout}, batch {args.batch}, precision {args.precision}, "
        f"channels_last_3d {args.channels_last}, compile {args.compile}, threads {torch.get_num_threads()}"
    )
    for size in args.sizes:
        torch.manual_seed(0)
        model = ResNet3D(args.depth, 4, layout=args.layout).to(device)
        fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x = torch.randn(args.batch, 4, size, size, size, device=device).to(memory_format=fmt)
        y = torch.randint(0, 2, (args.batch,), device=device)
        flops = step_flops(model, x, y)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        if args.compile:
            model = torch.compile(model)
            t0 = time.perf_counter()
            time_steps(model, opt, x, y, 1, args.precision, device)
            print(f"{size}^3: torch.compile took {time.perf_counter() - t0:.1f} s (once per process)")
        step_s = time_steps(model, opt, x, y, args.steps, args.precision, device)
        step_sps = args.steps * args.batch / step_s
        tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
        try:
            cached = fake_cache(tmp, args.cohort or max(2 * args.batch, 8), size)
            batches = max(4, args.steps)
            pipes = {}
            for name, resident in (("loader", False), ("resident", True)):
                pipe_s = time_pipeline(cached, args.batch, batches, device, args.workers, resident)
                pipes[name] = batches * args.batch / pipe_s
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        tflops = flops * args.steps / step_s / 1e12
        print(
            f"{size}^3: step {step_sps:.2f} samples/s ({flops / args.batch / 1e9:.0f} GFLOP/sample fwd+bwd, "
            f"{tflops:.2f} TFLOP/s); input pipeline "
            + ", ".join(f"{k} {v:.2f} samples/s = {v / step_sps:.1f}x the step" for k, v in pipes.items())
            + " (goal >= 10x)"
        )
        if args.json:
            figures = {"size": size, "step_samples_per_s": step_sps, "tflops": tflops, **pipes}
            Path(args.json).write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
