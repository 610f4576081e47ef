"""Byte-compile what the commands import, once, at install time: `python -m brats.precompile`.

`make install` runs pip with --no-compile: pip would compile every file it installs, one after
the other (torch, scipy, sympy...), of which the commands import a fraction. Python compiles a
module when it first imports it and keeps the .pyc; left alone, that happens inside the first
generation, training launch, export and predict (bench/RESULTS.md, "second round").
Importing here the modules they load compiles the same files as part of the install. A module
missing from this torch or library version, or failing to import here, is skipped (the install
goes on; the command that needs it reports the problem): what is not compiled here is compiled
on first use.
"""

from __future__ import annotations

import importlib
import sys
import time

MODULES = (
    # training: `accelerate launch`, torch, the fused Adam's dynamo import, metrics and plots
    "accelerate.commands.accelerate_cli",
    "torch",
    "torch._dynamo",
    "accelerate",
    "sklearn.metrics",
    "scipy.optimize",
    "scipy.stats",
    "matplotlib.pyplot",
    "matplotlib.backends.backend_agg",
    "PIL.PngImagePlugin",
    # data: NIfTI reading and the synthetic cohort's CLI
    "SimpleITK",
    "nibabel",
    "isal.isal_zlib",
    "typer",
    "pydantic",  # typer's option parsing
    # export and predict
    "torch.onnx",
    "torch.onnx._internal.torchscript_exporter.utils",
    "onnx",
    "onnxruntime",
    # this package: every command's modules
    "brats.training.engine",
    "brats.evaluation.cross_validation",
    "brats.evaluation.cam_montage",
    "brats.evaluation.export",
    "brats.deploy.report",
    "brats.synthetic",
    "brats.prepare",
)


def main() -> None:
    start = time.perf_counter()
    skipped = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # absent, or failing to load here: the command that needs it will say
            skipped.append(name)
    note = f" (skipped, not importable here: {', '.join(skipped)})" if skipped else ""
    print(f"byte-compiled the modules the commands import in {time.perf_counter() - start:.1f} s{note}")
    if sys.flags.dont_write_bytecode:
        print("PYTHONDONTWRITEBYTECODE is set: nothing was kept; unset it to keep the .pyc files")


if __name__ == "__main__":
    main()
