"""Where `make demo` spends its time, from a fresh clone, step by step.

    python3 bench/demo.py                       # clone this checkout's HEAD to a temp folder, make demo
    python3 bench/demo.py --src URL_OR_DIR --rev COMMIT --dir /tmp/demo-before --keep
    python3 bench/demo.py --summarize /tmp/demo-before          # the table again, from its logs

Standard library only: it runs before the demo's virtual environment exists. Every recipe line
of the Makefile runs through bench/timed (make's SHELL), and so does each training launch (the
Makefile's ACCEL), so the clone is measured as committed, whatever its Makefile looks like. The
training log splits each launch into time before each fold's first epoch (interpreter, torch and
accelerate start-up, data, model), epochs (training and validation, as the engine times them)
and the rest (checkpoint and resume-state writes after each epoch); log times have a resolution
of one second, epoch times do not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TIMED = BENCH / "timed"
ACCEL_ARGS = (
    ".venv/bin/accelerate launch --quiet --config_file accelerate_config.yaml"  # the Makefile's ACCEL
)

# (step name, pattern of the timed command line); the first match names a line
STEPS = (
    ("venv", r"-m venv"),
    ("install: pip upgrade", r"pip install.*--upgrade pip"),
    ("install: torch", r"pip install.*torch"),
    ("install: package + deps", r"pip install"),
    ("install: byte-compile", r"compileall|brats\.precompile"),
    ("install: other", r"touch \.venv|\.installed"),
    ("generate the cohort and new patients", r"brats\.synthetic"),
    ("prepare the cache", r"brats\.prepare"),
    ("evaluate", r"evaluate\.py"),
    ("export", r"export\.py"),
    ("predict", r"predict\.py"),
)
EPOCH = re.compile(
    r"^(\d\d:\d\d:\d\d) (?:\[RANK \d+\] )?epoch (\d+)/\d+ .*\(([\d.]+)s, train ([\d.]+) samples/s\)"
)
FOLD = re.compile(r"^(\d\d:\d\d:\d\d) (?:\[RANK \d+\] )?fold (\d+): (\d+) train .*effective batch (\d+) x")


@dataclass
class Line:
    start: float
    end: float
    command: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Training:
    launches: list[Line] = field(default_factory=list)
    epochs: int = 0
    train_s: float = 0.0  # samples / (samples per second), as the engine measured it
    epoch_s: float = 0.0  # training + validation (raw and EMA), the engine's `seconds`
    before_first_epoch_s: float = 0.0  # launch or previous fold's end -> first epoch's start
    folds: int = 0


def read_lines(log: Path) -> list[Line]:
    lines = []
    for raw in log.read_text().splitlines():
        start, end, command = raw.split("\t", 2)
        lines.append(Line(float(start), float(end), command))
    return lines


def clock(hms: str, near: float) -> float:
    """HH:MM:SS of a log line as epoch seconds, on the day of `near` (a launch's start)."""
    day = dt.datetime.fromtimestamp(near).date()
    t = dt.datetime.combine(day, dt.time.fromisoformat(hms)).timestamp()
    return t + 86400 if t < near - 43200 else t


def parse_training(output: Path, launches: list[Line]) -> Training:
    """Epoch and fold lines of the demo's output, attributed to the launch they fall in."""
    tr = Training(launches=launches)
    last_end = None  # the previous event of this launch: its start, or the last epoch's end
    launch_i, batch, n_train, fold_first = -1, 4, 0, False
    for text in output.read_text(errors="replace").splitlines():
        if m := FOLD.match(text):
            t = clock(m.group(1), launches[0].start)
            while launch_i + 1 < len(launches) and launches[launch_i + 1].start <= t + 1:
                launch_i += 1
                last_end = launches[launch_i].start
            n_train, batch, fold_first = int(m.group(3)), int(m.group(4)), True
            tr.folds += 1
        elif (m := EPOCH.match(text)) and launch_i >= 0:
            end, seconds, per_s = clock(m.group(1), launches[0].start), float(m.group(3)), float(m.group(4))
            if fold_first and last_end is not None:
                tr.before_first_epoch_s += max(0.0, end - seconds - last_end)
                fold_first = False
            last_end = end
            tr.epochs += 1
            tr.epoch_s += seconds
            tr.train_s += (n_train - n_train % batch) / per_s
    return tr


def summarize(folder: Path) -> str:
    """The breakdown table (markdown) of a measured clone."""
    lines = read_lines(folder / "bench_times.tsv")
    output = folder / "bench_output.log"
    # each launch is logged twice (the recipe line, and the launch inside it through ACCEL), and
    # older Makefiles ran every fold's launch from one `for` line: keep the innermost lines only
    trains = [ln for ln in lines if "train.py" in ln.command and not ln.command.startswith("make")]

    def holds_another(ln: Line) -> bool:
        return any(o is not ln and ln.start <= o.start and o.end <= ln.end for o in trains)

    launches = [ln for ln in trains if not holds_another(ln)]
    rows: dict[str, float] = {}
    for ln in lines:
        if ln in launches:
            continue
        name = next((s for s, pattern in STEPS if re.search(pattern, ln.command)), None)
        if name:
            rows[name] = rows.get(name, 0.0) + ln.seconds
    tr = parse_training(output, launches)
    train_wall = sum(ln.seconds for ln in launches)
    total = max(ln.end for ln in lines) - min(ln.start for ln in lines)
    install = sum(v for k, v in rows.items() if k.startswith(("venv", "install")))
    out = ["| step | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in rows.items() if k.startswith(("venv", "install"))]
    out.append(f"| **install, total** | **{install:.1f}** |")
    for k in ("generate the cohort and new patients", "prepare the cache"):
        out.append(f"| {k} | {rows.get(k, 0.0):.1f} |")
    out.append(
        f"| training: {len(launches)} launch(es), {tr.folds} folds, {tr.epochs} epochs | {train_wall:.1f} |"
    )
    out.append(
        f"| - before each fold's first epoch (start-up, data, model) | {tr.before_first_epoch_s:.1f} |"
    )
    out.append(f"| - epochs: training steps | {tr.train_s:.1f} |")
    out.append(f"| - epochs: validation (raw + EMA) | {tr.epoch_s - tr.train_s:.1f} |")
    rest = train_wall - tr.before_first_epoch_s - tr.epoch_s
    out.append(f"| - checkpoint / state writes, logging, exit | {rest:.1f} |")
    for k in ("evaluate", "export", "predict"):
        out.append(f"| {k} | {rows.get(k, 0.0):.1f} |")
    out.append(f"| **after install** | **{total - install:.1f}** |")
    out.append(f"| **total** | **{total:.1f}** |")
    summary = folder / "demo" / "run" / "evaluation" / "summary.json"
    if summary.is_file():
        pooled = json.loads(summary.read_text())["pooled"]
        lo, hi = pooled.get("auc_ci95", (float("nan"), float("nan")))
        out.append(
            f"\npooled out-of-fold AUC {pooled.get('auc', float('nan')):.3f} (95% CI {lo:.3f}-{hi:.3f})"
        )
    for text in output.read_text(errors="replace").splitlines():
        if "graded patients match" in text:
            out.append(text.strip())
    return "\n".join(out)


def measure(src: str, rev: str | None, folder: Path, make_args: list[str]) -> None:
    subprocess.run(["git", "clone", "-q", src, str(folder)], check=True)
    if rev:
        subprocess.run(["git", "-C", str(folder), "checkout", "-q", rev], check=True)
    times = folder / "bench_times.tsv"
    env = dict(os.environ, BENCH_LOG=str(times))
    cmd = ["make", "demo", f"SHELL={TIMED}", f"ACCEL={TIMED} {ACCEL_ARGS}", *make_args]
    t0 = time.time()
    with open(folder / "bench_output.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for chunk in iter(proc.stdout.readline, b""):
            log.write(chunk.decode(errors="replace"))
            log.flush()
        rc = proc.wait()
    print(f"make demo: exit {rc} after {time.time() - t0:.1f} s in {folder}", file=sys.stderr)
    if rc:
        raise SystemExit(f"make demo failed: see {folder / 'bench_output.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(BENCH.parent), help="repository to clone [this checkout]")
    ap.add_argument("--rev", help="commit to check out after cloning [the clone's HEAD]")
    ap.add_argument("--dir", type=Path, help="clone here (must not exist) [a temp folder]")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its .venv is ~2 GB)")
    ap.add_argument("--summarize", type=Path, help="print the table of an earlier measured clone")
    ap.add_argument("make_args", nargs="*", help="extra make arguments, e.g. DEMO_ARGS=...")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="brats-demo-")) / "clone"
    try:
        measure(args.src, args.rev, folder, args.make_args)
        print(summarize(folder))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
