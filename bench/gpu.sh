#!/usr/bin/env bash
# The training path on a CUDA GPU with bf16, and its throughput, in one run:
#   1. model step alone (ResNet-50 strided, batch 4): eager, channels_last_3d, channels_last + compile;
#      input pipeline per path (DataLoader `loader` vs `resident`), as ratios to the model step;
#   2. train.py end to end on a synthetic cohort of 285 patients (228 train in fold 0) at 128^3:
#      epoch samples/s with validation and EMA, and its ratio to the model step.
#   bash bench/gpu.sh               # on the GPU machine; prints figures for bench/RESULTS.md
#   SMOKE=1 bash bench/gpu.sh       # tiny sizes on the CPU: checks this script itself
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Machines without SimpleITK/nibabel: put their wheels (manylinux, matching Python) in .whl/.
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu PREC=no SIZE=32 DEPTH=10 PATIENTS=20 SHAPE="40 40 28" EPOCHS=2 STEPS=2 WORKERS=0 CPU=--cpu
else
  DEV=cuda PREC=bf16 SIZE=128 DEPTH=50 PATIENTS=285 SHAPE="160 160 104" EPOCHS=${EPOCHS:-3} STEPS=20 WORKERS=8 CPU=
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(--device $DEV --precision $PREC --sizes $SIZE --depth $DEPTH --steps $STEPS --workers $WORKERS --cohort 16)
$PY bench/train.py "${common[@]}" --batch 4 --json "$tmp/eager.json"
$PY bench/train.py "${common[@]}" --batch 4 --channels-last --json "$tmp/cl.json"
$PY bench/train.py "${common[@]}" --batch 4 --channels-last --compile --json "$tmp/compiled.json"
$PY bench/train.py "${common[@]}" --batch 8 --channels-last --compile --json "$tmp/compiled8.json"

$PY -m brats.synthetic "$tmp/cohort" --patients $PATIENTS --seed 0 --shape $SHAPE
$PY -m brats.prepare "$tmp/cohort" --out "$tmp/cache" --size $SIZE --no-progress
$PY -m accelerate.commands.launch --config_file accelerate_config.yaml train.py --fold 0 \
  --data "$tmp/cache" --run "$tmp/run" --depth $DEPTH --max-epochs $EPOCHS --min-epochs $EPOCHS \
  --no-progress --ema-decay 0.995 $CPU ${TRAIN_ARGS:-}
$PY - "$tmp" <<'PY'
import csv, json, sys, torch
tmp = sys.argv[1]
fig = {k: json.load(open(f"{tmp}/{k}.json")) for k in ("eager", "cl", "compiled", "compiled8")}
rows = list(csv.DictReader(open(f"{tmp}/run/fold_0/metrics.csv")))
folds = json.load(open(f"{tmp}/run/splits.json"))["folds"]
n_train = sum(len(f["val"]) for f in folds) - len(folds[0]["val"]) - len(folds[0].get("inner_val", []))
later = rows[1:] or rows  # the first epoch pays cudnn autotuning and allocator warm-up
epoch_sps = n_train * len(later) / sum(float(r["seconds"]) for r in later)
train_sps = [float(r["train_samples_per_s"]) for r in later if r.get("train_samples_per_s")]
step = fig["eager"]["step_samples_per_s"]
for k, v in fig.items():
    print(f"model step {k}: {v['step_samples_per_s']:.1f} samples/s, {v['tflops']:.1f} TFLOP/s; "
          f"pipeline loader {v['loader'] / v['step_samples_per_s']:.1f}x, resident {v['resident'] / v['step_samples_per_s']:.1f}x the step")
print(f"train.py end to end: {epoch_sps:.1f} samples/s per epoch incl. validation and EMA "
      f"({n_train} train patients); train-only {sum(train_sps) / max(len(train_sps), 1):.1f} samples/s")
print(f"ratio end-to-end / model step (eager, batch 4): {epoch_sps / step:.2f} (goal >= 0.85)")
ckpt = torch.load(f"{tmp}/run/fold_0/best.pt", weights_only=True)
print("best.pt epoch", ckpt["epoch"], "val AUC", round(ckpt["val_metrics"]["auc"], 4),
      "mixed precision", ckpt["config"]["mixed_precision"])
PY
