#!/usr/bin/env bash
# Checks the training path on a CUDA GPU with bf16 and measures throughput, in one short run.
# Run from the repository root on a machine with a GPU and PyTorch (plus accelerate) installed:
#   bash bench/gpu.sh            # writes nothing; prints figures for bench/RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Machines without SimpleITK/nibabel: put their wheels (manylinux, matching Python) in .whl/.
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), torch.__version__, "bf16", torch.cuda.is_bf16_supported())
PY
# 1) Throughput: ResNet-50 at 128^3, bf16, with and without channels_last_3d, both layouts.
for layout in strided medicalnet; do
  $PY bench/train.py --device cuda --precision bf16 --sizes 128 --batch 4 --steps 10 --layout $layout --workers 8
  $PY bench/train.py --device cuda --precision bf16 --sizes 128 --batch 4 --steps 10 --layout $layout --workers 8 --channels-last
done
# 2) The real training path end to end on CUDA with bf16 (accelerate launch, tiny synthetic cohort).
tmp=$(mktemp -d)
$PY -m brats.synthetic "$tmp/cohort" --patients 20 --seed 0 --shape 96 96 64
$PY -m brats.prepare "$tmp/cohort" --out "$tmp/cache" --size 64 --no-progress
$PY -m accelerate.commands.launch --config_file accelerate_config.yaml train.py --fold 0 --data "$tmp/cache" \
  --run "$tmp/run" --depth 50 --max-epochs 2 --min-epochs 1 --no-progress --ema-decay 0.995
$PY - "$tmp/run/fold_0" <<'PY'
import sys, torch
ckpt = torch.load(f"{sys.argv[1]}/best.pt", weights_only=True)
print("best.pt epoch", ckpt["epoch"], "val AUC", ckpt["val_metrics"]["auc"], "mixed precision", ckpt["config"]["mixed_precision"])
PY
rm -rf "$tmp"
