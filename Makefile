# brats: every target creates .venv and installs into it when needed, and skips what is done.
# CUDA users: override the torch pin, e.g. `make install TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`
# (the default is the CPU build so that a plain install never pulls multi-GB CUDA wheels).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
# pip byte-compiles every file it installs, one after the other: ~1 min of CPU for torch, scipy,
# sympy... of which the commands import a fraction. The install compiles that fraction instead
# (brats.precompile imports what the commands import); anything else is compiled when first
# imported. Python keeps the .pyc files only where it may write them: the commands below may, even
# where PYTHONDONTWRITEBYTECODE is set (they land in .venv, where pip would have written them
# anyway, and in brats/__pycache__, which git ignores); otherwise every start would compile again.
PIP := $(BIN)/python -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE

DATA   ?= demo/cohort
CACHE  ?= $(DATA)_cache$(SIZE)
RUN    ?= runs/cv
SIZE   ?= 128
FOLDS  ?= 0 1 2 3 4
ACCEL  := $(BIN)/accelerate launch --quiet --config_file accelerate_config.yaml
TRAIN_ARGS ?=
EVAL_ARGS  ?=

.PHONY: install install-dev test lint prepare cv evaluate export predict ablation demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What the commands and the demo need; the venv's own pip is recent enough (no upgrade step).
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e .
	$(BIN)/python -m brats.precompile
	touch $@

# Also pytest and ruff, for make test / make lint only.
$(DEV): $(STAMP)
	$(PIP) -e ".[dev]"
	touch $@

install: $(STAMP)

install-dev: $(DEV)

test: $(DEV)
	$(BIN)/python -m pytest

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

prepare: $(STAMP)
	$(BIN)/python -m brats.prepare $(DATA) --out $(CACHE) --size $(SIZE)

# Folds 0..4 in turn in one process (restartable: a finished fold is skipped, a killed one
# resumes), then the verified CV report. GPUS="0 1 2 3" trains folds concurrently, one per GPU,
# each logging to RUN/fold_K/train.log. LAUNCHER=slurm submits one job per fold to SLURM (a job
# array; SLURM_ARGS="--partition gpu --time 4:00:00 --account A"), waits, then evaluates in a job.
GPUS ?=
LAUNCHER ?= local
SLURM_ARGS ?=
cv: $(STAMP)
	@test -n "$(DATA)" || (echo "usage: make cv DATA=<cache or BraTS folder> RUN=<run folder> [GPUS=\"0 1\"]"; exit 1)
ifeq ($(LAUNCHER),slurm)
	$(BIN)/python -m brats.cv --launcher slurm $(SLURM_ARGS) --fold "$(FOLDS)" --data $(DATA) --run $(RUN) \
		--size $(SIZE) --evaluate-args "$(EVAL_ARGS)" -- $(TRAIN_ARGS)
else
ifeq ($(strip $(GPUS)),)
	$(ACCEL) train.py --fold "$(FOLDS)" --data $(DATA) --run $(RUN) --resume $(TRAIN_ARGS)
else
	$(BIN)/python -m brats.cv --gpus "$(GPUS)" --fold "$(FOLDS)" --data $(DATA) --run $(RUN) --size $(SIZE) -- $(TRAIN_ARGS)
endif
	$(BIN)/python evaluate.py --run $(RUN) $(EVAL_ARGS)
endif

evaluate: $(STAMP)
	$(BIN)/python evaluate.py --run $(RUN) $(EVAL_ARGS)

export: $(STAMP)
	$(BIN)/python export.py --run $(RUN)

MODEL ?= $(RUN)/model.onnx
INPUT ?= demo/new
OUT   ?= predictions.csv
predict: $(STAMP)
	$(BIN)/python predict.py $(MODEL) $(INPUT) --out $(OUT)

# The seed's first setup (section 1) against its final policy (section 6) on the same folds.
ablation: $(STAMP)
	$(MAKE) cv DATA=$(DATA) RUN=$(RUN)/baseline TRAIN_ARGS="--policy baseline $(TRAIN_ARGS)"
	$(MAKE) cv DATA=$(DATA) RUN=$(RUN)/final TRAIN_ARGS="--policy final $(TRAIN_ARGS)"
	$(BIN)/python -m brats.ablation $(RUN)/baseline $(RUN)/final --out $(RUN)/ablation.md

# The demo preset: tiny cubes and a depth-10 ResNet so that 5 folds train in minutes on 2 CPU
# cores; lr 1e-3 without accumulation because this small model starts from scratch; EMA 0.9
# because a demo epoch is 12 updates. Each fold keeps its last epoch (--select last): on 12
# validation patients the best-AUC epoch is noise (often epoch 2 or 3, barely trained), and the
# out-of-fold figures are then honest, not optimistic. A quarter of the 80 patients is held out of
# every fold (--test-fraction 0.25): the ensemble is scored there and its decision fitted there.
# Measured (seed 42, bench/RESULTS.md): pooled out-of-fold AUC 0.841 over the 60 CV patients,
# the ensemble's test-set AUC 0.920 over the 20 held out.
DEMO_ARGS ?= --depth 10 --lr 1e-3 --grad-accum 1 --max-epochs 8 --select last --warmup-epochs 1 \
	--ema-decay 0.9 --state-every 60 --workers 0 --no-progress --test-fraction 0.25
DEMO_EVAL ?= --calibrate platt --threshold youden
DEMO_SHAPE := 120 120 78

demo/cohort/.done: | $(STAMP)
	$(BIN)/python -m brats.synthetic demo/cohort --patients 80 --seed 0 --shape $(DEMO_SHAPE)
	touch $@

# The new patients include three as a hospital might send them (the first three: skull on, 5.5 mm
# slices, T1 and FLAIR swapped): predict refuses the first two and flags the third.
demo/new/.done: | $(STAMP)
	$(BIN)/python -m brats.synthetic demo/new --patients 20 --seed 2026 --shape $(DEMO_SHAPE) --prefix Brats18_NEW \
		--corrupt skull_on --corrupt thick_slices --corrupt swapped_t1_flair
	touch $@

demo/cache/index.json: demo/cohort/.done
	$(BIN)/python -m brats.prepare demo/cohort --out demo/cache --size 32 --no-progress

# What a user should deploy: the five folds as one ensemble, deciding at the threshold chosen on
# the held-out test set; predict prints the new patients' accuracy beside the test set's.
# A rerun redoes only what is out of date (make compares the files' times): the training and its
# evaluation when the cache changed (a killed training resumes), the export when the evaluation
# changed, the prediction when the model or the new patients changed. Delete demo/run to train
# again with other DEMO_ARGS; `make clean` removes everything the demo wrote.
demo/run/evaluation/summary.json: demo/cache/index.json | $(STAMP)
	$(MAKE) --no-print-directory cv DATA=demo/cache RUN=demo/run TRAIN_ARGS="$(DEMO_ARGS)" EVAL_ARGS="$(DEMO_EVAL)"

demo/run/model_ensemble.onnx: demo/run/evaluation/summary.json
	$(BIN)/python export.py --run demo/run --ensemble

demo/predictions.csv: demo/run/model_ensemble.onnx demo/new/.done
	$(BIN)/python predict.py demo/run/model_ensemble.onnx demo/new --out demo/predictions.csv

demo: $(STAMP) demo/predictions.csv
	@echo "demo: the report demo/run/evaluation/report.md, the model card demo/run/model_ensemble_card.md," \
		"the new patients' grades demo/predictions.csv (a rerun redoes only what is out of date)"

clean:
	rm -rf demo runs .pytest_cache
