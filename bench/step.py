"""Where one training step of the demo's model goes: forward, backward, Adam, EMA.

    python bench/step.py                        # ResNet-10, 4x32^3, batch 4 and 8, Adam per-tensor and fused
    python bench/step.py --threads 1 --repeats 5
    python bench/step.py --conv both --adam fused   # the one-voxel product against plain nn.Conv3d

Variants: batch x Adam (per-tensor, fused) x convolution (`Conv3d`'s one-voxel product, or plain
nn.Conv3d everywhere, as before it).

Each variant runs `--repeats` times, interleaved with the others, and the fastest repeat is kept
(these machines are shared: the minimum is the least disturbed). Times are wall-clock and CPU
(process) seconds per step and per sample; the optimizer is the engine's (param_groups, weight
decay), the EMA is ModelEma at 0.9, as in `make demo`.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn

from brats.models.resnet import Conv3d, build_model, param_groups
from brats.training.config import make_config
from brats.training.ema import ModelEma

PARTS = ("forward", "backward", "adam", "ema")


def one_step(model, opt, ema, x, y) -> dict[str, tuple[float, float]]:
    """(wall s, CPU s) of each part of one step."""
    marks = [(time.perf_counter(), time.process_time())]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    marks.append((time.perf_counter(), time.process_time()))
    loss.backward()
    marks.append((time.perf_counter(), time.process_time()))
    opt.step()
    opt.zero_grad(set_to_none=True)
    marks.append((time.perf_counter(), time.process_time()))
    ema.update(model)
    marks.append((time.perf_counter(), time.process_time()))
    return {p: (b[0] - a[0], b[1] - a[1]) for p, a, b in zip(PARTS, marks, marks[1:])}


def measure(depth: int, size: int, batch: int, fused: bool, plain: bool, steps: int) -> dict[str, tuple]:
    """Mean per-step (wall, CPU) of each part over `steps` steps after one warm-up step."""
    torch.manual_seed(0)
    model = build_model(make_config(data="x", depth=depth))
    if plain:
        for m in model.modules():
            if isinstance(m, Conv3d):
                m.forward = nn.Conv3d.forward.__get__(m)
    opt = torch.optim.Adam(param_groups(model, 1e-3, 2.0, 1e-4), fused=fused or None)
    ema = ModelEma(model, 0.9)
    x, y = torch.randn(batch, 4, size, size, size), torch.randint(0, 2, (batch,))
    one_step(model, opt, ema, x, y)
    total = {p: (0.0, 0.0) for p in PARTS}
    for _ in range(steps):
        for p, (w, c) in one_step(model, opt, ema, x, y).items():
            total[p] = (total[p][0] + w / steps, total[p][1] + c / steps)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adam", choices=("both", "fused", "per-tensor"), default="both")
    ap.add_argument("--conv", choices=("both", "one-voxel", "plain"), default="one-voxel")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, ResNet-{args.depth}, 4x{args.size}^3, {args.threads} thread(s)")
    adams = {"both": (False, True), "fused": (True,), "per-tensor": (False,)}[args.adam]
    plains = {"both": (False, True), "one-voxel": (False,), "plain": (True,)}[args.conv]
    variants = list(itertools.product(args.batches, adams, plains))
    best: dict[tuple[int, bool, bool], dict] = {}
    for _ in range(args.repeats):
        for v in variants:
            r = measure(args.depth, args.size, *v, args.steps)
            wall = sum(w for w, _ in r.values())
            if v not in best or wall < best[v]["wall"]:
                best[v] = {"wall": wall, "parts": r}
    cols = ("batch", "Adam", "convolution", *PARTS, "step", "per sample", "CPU per sample")
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for (batch, fused, plain), b in best.items():
        parts, cpu = b["parts"], sum(c for _, c in b["parts"].values())
        cells = " | ".join(f"{parts[p][0] * 1e3:.0f} ms" for p in PARTS)
        print(
            f"| {batch} | {'fused' if fused else 'per-tensor'} | {'plain' if plain else 'one-voxel'} "
            f"| {cells} "
            f"| {b['wall'] * 1e3:.0f} ms "
            f"| {b['wall'] / batch * 1e3:.0f} ms | {cpu / batch * 1e3:.0f} ms |"
        )


if __name__ == "__main__":
    main()
