#!/usr/bin/env bash
# The GPU path end to end, one line per check, with its throughput figures; under 5 minutes on
# one H100. Every check runs even when one before it failed; the exit status says whether all held.
#   1. the model step alone (ResNet-50 strided, bf16): eager at batch 4, channels_last_3d +
#      torch.compile at batch 8; the input pipeline per path, as ratios to the step;
#   2. train.py fold 0 in bf16 on the resident path, EMA on (samples/s per epoch);
#   3. fold 1 with --compile: its checkpoints hold the plain module's keys;
#   4. fold 2 killed with -9 after its first epochs, then resumed: nothing outlives the launcher,
#      the fold ends where an uninterrupted one would;
#   5. evaluate.py re-scores the three folds on the GPU, patient by patient (--strict);
#   6. export.py --ensemble from the run (parity with torch);
#   7. predict.py on new patients on the CPU, and with the CUDA provider when onnxruntime-gpu is there.
#   bash bench/gpu.sh            # on the GPU machine; prints figures for bench/RESULTS.md
#   SMOKE=1 bash bench/gpu.sh    # the same checks at toy sizes on the CPU: checks this script itself
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Machines without SimpleITK/nibabel: put their wheels (manylinux, matching Python) in .whl/.
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu PREC=no SIZE=32 DEPTH=10 PATIENTS=20 SHAPE="40 40 28" EPOCHS=3 STEPS=2 BATCH8=4 WORKERS=0
  CPU=--cpu BACKEND=aot_eager  # inductor's code generation takes ~30 s on 2 CPU cores
else
  DEV=cuda PREC=bf16 SIZE=128 DEPTH=50 PATIENTS=60 SHAPE="160 160 104" EPOCHS=${EPOCHS:-3} STEPS=20 BATCH8=8
  WORKERS=8 CPU= BACKEND=inductor
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
fi
tmp=$(mktemp -d)
trap '[ "${KEEP:-0}" = 1 ] || rm -rf "$tmp"' EXIT
failed=0
check() {  # check NAME OK-CONDITION-EXIT-STATUS DETAIL
  if [ "$2" = 0 ]; then echo "check $1: ok ($3)"; else echo "check $1: FAILED ($3)"; failed=1; fi
}
LAUNCH=($PY -m accelerate.commands.launch --config_file accelerate_config.yaml --mixed_precision $PREC)
TRAIN=(train.py --data "$tmp/cache" --run "$tmp/run" --depth $DEPTH --max-epochs $EPOCHS --min-epochs $EPOCHS
       --ema-decay 0.995 --no-progress --state-every 0 $CPU)

# 1. the model step and the input pipeline
common=(--device $DEV --precision $PREC --sizes $SIZE --depth $DEPTH --steps $STEPS --workers $WORKERS --cohort 16)
$PY bench/train.py "${common[@]}" --batch 4 --json "$tmp/eager.json" > "$tmp/step.log" 2>&1
check "model step, eager, batch 4" $? "$(tail -n 1 "$tmp/step.log")"
$PY bench/train.py "${common[@]}" --batch $BATCH8 --channels-last --compile --json "$tmp/compiled.json" \
  > "$tmp/step8.log" 2>&1
check "model step, channels_last + compile, batch $BATCH8" $? "$(tail -n 1 "$tmp/step8.log")"

# 2. bf16 training on the resident path
$PY -m brats.synthetic "$tmp/cohort" --patients $PATIENTS --seed 0 --shape $SHAPE > /dev/null &&
  $PY -m brats.synthetic "$tmp/new" --patients 4 --seed 9 --shape $SHAPE --prefix NEW > /dev/null &&
  $PY -m brats.prepare "$tmp/cohort" --out "$tmp/cache" --size $SIZE --no-progress > /dev/null
check "synthetic cohort prepared" $? "$PATIENTS patients at ${SIZE}^3"
"${LAUNCH[@]}" "${TRAIN[@]}" --fold 0 > "$tmp/fold0.log" 2>&1
status=$?
grep -q "resident" "$tmp/fold0.log" || status=1
check "train fold 0 ($PREC, resident)" $status \
  "$(grep -o 'data resident[^;]*' "$tmp/fold0.log" | head -n 1); $(grep -o '[0-9.]* samples/s' "$tmp/fold0.log" | tail -n 1)"

# 3. --compile
"${LAUNCH[@]}" "${TRAIN[@]}" --fold 1 --compile --compile-backend $BACKEND > "$tmp/fold1.log" 2>&1
status=$?
$PY - "$tmp/run/fold_1" <<'PY' || status=1
import sys, torch
for name in ("best.pt", "best_ema.pt"):
    keys = torch.load(f"{sys.argv[1]}/{name}", weights_only=True)["model_state_dict"]
    assert not [k for k in keys if k.startswith(("_orig_mod.", "module."))], name
PY
check "train fold 1 with --compile ($BACKEND): plain keys" $status \
  "$(grep -o 'first step took [0-9.]* s' "$tmp/fold1.log" | head -n 1)"

# 4. kill -9 of the launcher mid-fold, then --resume
"${LAUNCH[@]}" "${TRAIN[@]}" --fold 2 > "$tmp/fold2.log" 2>&1 &
launcher=$!
for _ in $(seq 1 1200); do  # until the first epoch's resume state is written (or the launch ended)
  [ -f "$tmp/run/fold_2/status.json" ] || ! kill -0 $launcher 2> /dev/null && break
  sleep 0.1
done
kill -9 $launcher 2> /dev/null
wait $launcher 2> /dev/null
sleep 3
survivors=$(pgrep -f "train.py.*$tmp/run.*--fold 2" | wc -l)
"${LAUNCH[@]}" "${TRAIN[@]}" --fold 2 --resume >> "$tmp/fold2.log" 2>&1
status=$?
[ "$survivors" = 0 ] || status=1
grep -q "resumed" "$tmp/fold2.log" || status=1
rows=$(($(cat "$tmp/run/fold_2/metrics.csv" 2> /dev/null | wc -l) - 1))
[ "$rows" = $EPOCHS ] || status=1
check "kill -9 mid-fold, then --resume" $status "$survivors training(s) outlived the launcher; $rows epochs in metrics.csv"

# 5. evaluate's re-score on the GPU
$PY evaluate.py --run "$tmp/run" --fold 0,1,2 --device $DEV --strict > "$tmp/eval.log" 2>&1
check "evaluate re-scores on $DEV (--strict)" $? "$(grep -o 'per-patient max |dp| [^,(]*' "$tmp/eval.log" | sort | tail -n 1)"

# 6. export
$PY export.py --run "$tmp/run" --ensemble --out "$tmp/model.onnx" > "$tmp/export.log" 2>&1
check "export --ensemble" $? "$(grep -o 'parity max |dp| [^)]*' "$tmp/export.log" | head -n 1)"

# 7. predict on the CPU, and on the GPU when onnxruntime-gpu is installed
$PY predict.py "$tmp/model.onnx" "$tmp/new" --out "$tmp/pred.csv" > "$tmp/predict.log" 2>&1
check "predict on the CPU" $? "$(grep -o 'wrote .*' "$tmp/predict.log" | head -n 1)"
if $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  $PY predict.py "$tmp/model.onnx" "$tmp/new" --out "$tmp/pred_cuda.csv" --device cuda > "$tmp/predict_cuda.log" 2>&1
  status=$?
  $PY - "$tmp/pred.csv" "$tmp/pred_cuda.csv" <<'PY' || status=1
import csv, sys
a, b = ([float(r["p_hgg"]) for r in csv.DictReader(open(f))] for f in sys.argv[1:])
assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (a, b)
PY
  check "predict with the CUDA provider (agrees with the CPU within 1e-3)" $status "$(grep -o 'wrote .*' "$tmp/predict_cuda.log")"
else
  $PY predict.py "$tmp/model.onnx" "$tmp/new" --out "$tmp/pred_cuda.csv" --device cuda > "$tmp/predict_cuda.log" 2>&1
  [ $? = 1 ] && grep -q "onnxruntime-gpu" "$tmp/predict_cuda.log"
  check "predict --device cuda without onnxruntime-gpu says what to install" $? "$(tail -n 1 "$tmp/predict_cuda.log")"
fi

$PY - "$tmp" <<'PY'
import csv, json, sys
tmp = sys.argv[1]
for k in ("eager", "compiled"):
    try:
        v = json.load(open(f"{tmp}/{k}.json"))
    except OSError:
        continue
    print(f"figure model step {k}: {v['step_samples_per_s']:.1f} samples/s, {v['tflops']:.2f} TFLOP/s; "
          f"input pipeline loader {v['loader'] / v['step_samples_per_s']:.1f}x, resident "
          f"{v['resident'] / v['step_samples_per_s']:.1f}x the step")
try:
    rows = list(csv.DictReader(open(f"{tmp}/run/fold_0/metrics.csv")))
    later = rows[1:] or rows  # the first epoch pays cuDNN autotuning and the allocator's warm-up
    train = [float(r["train_samples_per_s"]) for r in later]
    print(f"figure train.py fold 0: {sum(train) / len(train):.1f} training samples/s, "
          f"{sum(float(r['seconds']) for r in later) / len(later):.1f} s per epoch incl. validation and EMA")
except (OSError, KeyError, ZeroDivisionError):
    pass
PY
[ $failed = 0 ] && echo "all checks passed" || echo "some checks FAILED"
exit $failed
