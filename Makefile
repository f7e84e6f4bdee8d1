# lowrank-deploy: compress → export → runtime, chained.
#   make export MODEL=resnet34 [METHOD=tucker2] [RATIO=4 | FLOPS=0.5] [WEIGHTS=auto] [BATCH=1] [OUT=artifacts]
#   make train MODEL=cifar_resnet18_w0.25 DATA=fashion-mnist EPOCHS=3
#   make test
# Both create .venv and install the project when it is missing or older than pyproject.toml.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed

MODEL    ?= resnet34
METHOD   ?= tucker2
# RATIO = parameter compression factor of the whole model (the CLI's default is 4); FLOPS = fraction of the
# model's FLOPs to remove instead (0.5 = half). Give one of them; every method takes either.
RATIO    ?=
FLOPS    ?=
WEIGHTS  ?= auto
BATCH    ?= 1
OUT      ?= artifacts
BACKEND  ?= ort
DURATION ?= 10
THREADS  ?=
ROUND_TO ?=
RANK_RULE ?=
# METHOD=vbmf-tucker2 options: ExpandNets rate of the training stage (0 = off), orthogonal regularizer
# (so|srip|none), MUSCO multi-stage fine-tuning in STAGES groups. Other methods refuse them by name.
EXPANSION ?=
ORTHO ?=
STAGES ?=
PRECISION ?= fp16
# Extra flags for `python -m export engine` (e.g. ENGINE_ARGS="--max-batch 32 --timing-cache t.cache").
ENGINE_ARGS ?=
# tensorrt-stubs for `make lint` (mypy), installed --no-deps beside the venv: the package depends on the
# `tensorrt` download stub, which cannot be installed without a GPU driver.
TRT_STUBS := tensorrt-stubs==10.13.0.35.1
TYPESTUBS := $(VENV)/typestubs
# Extra flags for `python -m compress run` (e.g. COMPRESS_ARGS="--exclude 'layer1.*'").
COMPRESS_ARGS ?=
# Data: DATA=fashion-mnist (Debian package dataset-fashion-mnist, installed by `make data`) or a folder
# (CIFAR-10/100 python batches, IDX files, ImageFolder train/ + val/). With DATA, `make export` records
# dense / raw / fine-tuned accuracy; TRAIN_EPOCHS trains the dense model first (cached in OUT/<model>/train-<data>).
DATA ?=
TRAIN_EPOCHS ?= 0
FINETUNE_EPOCHS ?= 0
EVAL_SAMPLES ?=
EPOCHS ?= 3
# Processes for `make train` / `make finetune` (torchrun DDP: gloo on CPU, NCCL on GPUs).
NPROC ?= 1
# Extra flags for `python -m compress train|finetune` (e.g. TRAIN_ARGS="--lr 0.05 --label-smoothing 0.1").
TRAIN_ARGS ?=
FASHION_MNIST_PKG := dataset-fashion-mnist
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist

# Run directory: OUT/<model>/<method>; a factory MODEL=path/to/file.py:fn is named file.fn.
_FACTORY  := $(findstring :,$(MODEL))
_MODEL_NAME := $(if $(_FACTORY),$(basename $(notdir $(firstword $(subst :, ,$(MODEL))))).$(lastword $(subst :, ,$(MODEL))),$(MODEL))
RUN_DIR  := $(OUT)/$(_MODEL_NAME)/$(METHOD)

_OPT_TARGET := $(if $(RATIO),--ratio '$(RATIO)',) $(if $(FLOPS),--flops '$(FLOPS)',)
_OPT_ROUND  := $(if $(ROUND_TO),--round-to $(ROUND_TO),)
_OPT_RULE   := $(if $(RANK_RULE),--rank-rule $(RANK_RULE),)
_OPT_THREADS := $(if $(THREADS),--threads $(THREADS),)
_OPT_METHOD := $(if $(EXPANSION),--expansion $(EXPANSION),) $(if $(ORTHO),--orthogonality $(ORTHO),) $(if $(STAGES),--stages $(STAGES),)
_OPT_EVAL   := $(if $(EVAL_SAMPLES),--eval-samples $(EVAL_SAMPLES),)
_OPT_DATA   := $(if $(DATA),--data '$(DATA)' --train-epochs $(TRAIN_EPOCHS) --finetune-epochs $(FINETUNE_EPOCHS) $(_OPT_EVAL),)
# The data prerequisite: installs Fashion-MNIST with apt when DATA=fashion-mnist and it is missing.
_DATA_DEP   := $(if $(filter fashion-mnist,$(DATA)),data,)
_DATA_NAME  := $(if $(filter fashion-mnist,$(DATA)),fashion-mnist,$(notdir $(patsubst %/,%,$(DATA))))
_FT_EPOCHS  := $(if $(filter 0,$(FINETUNE_EPOCHS)),1,$(FINETUNE_EPOCHS))
TRAIN_DIR   := $(OUT)/$(_MODEL_NAME)/train-$(_DATA_NAME)
_LAUNCH     := $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m,$(PY) -m)

.PHONY: help venv data export train finetune engine test test-all lint bench clean

help:
	@echo "make export MODEL=resnet34 [METHOD=tucker2|svd|tai|cp|vbmf-tucker2|ljsvd|rjsvd1|rjsvd2|bijsvd|lrsd|cc]"
	@echo "            [RATIO=4 (params factor) | FLOPS=0.5 (fraction of FLOPs removed)] [WEIGHTS=auto|imagenet|random|path]"
	@echo "            [BATCH=1] [OUT=artifacts] [BACKEND=ort|torch] [DURATION=10] [ROUND_TO=8]"
	@echo "            [RANK_RULE=uniform|param-reduction|evbmf|energy] [EXPANSION=4 ORTHO=so|srip|none STAGES=1 (vbmf-tucker2)]"
	@echo "            [DATA=fashion-mnist|folder] [TRAIN_EPOCHS=0] [FINETUNE_EPOCHS=0] [EVAL_SAMPLES=N]"
	@echo "make train  MODEL=cifar_resnet18_w0.25 DATA=fashion-mnist [EPOCHS=3] [NPROC=1] [TRAIN_ARGS=...]"
	@echo "make finetune MODEL=... METHOD=... DATA=... [FINETUNE_EPOCHS=1] [NPROC=1]  fine-tune a run directory"
	@echo "make data   install Fashion-MNIST (apt package $(FASHION_MNIST_PKG)) when it is missing"
	@echo "make test   run the test suite (CPU; GPU/TensorRT/Jetson tests skip with a reason)"
	@echo "make engine MODEL=... METHOD=... PRECISION=fp16|fp32|int8 [ENGINE_ARGS=...]  TensorRT engines (needs TensorRT + GPU)"
	@echo "make lint   ruff check + format check, mypy on the TensorRT modules, hadolint on docker/"

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST from Debian (no download from the internet): apt-get as root, else through sudo.
data:
	@if [ -f '$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz' ]; then exit 0; fi; \
	echo "installing $(FASHION_MNIST_PKG) with apt"; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; \
	else echo "error: Fashion-MNIST is missing and this user cannot run apt-get; install the Debian package $(FASHION_MNIST_PKG) (or set DATA=<folder>)" >&2; exit 1; fi; \
	{ $$SUDO apt-get install -y -q $(FASHION_MNIST_PKG) >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q $(FASHION_MNIST_PKG) >/dev/null; }; } \
	|| { echo "error: could not install the Debian package $(FASHION_MNIST_PKG) with apt-get; install it by hand (or set DATA=<folder>)" >&2; exit 1; }

export: $(STAMP) $(_DATA_DEP)
	$(PY) -m compress run --model '$(MODEL)' --method '$(METHOD)' $(_OPT_TARGET) --weights '$(WEIGHTS)' \
		--batch '$(BATCH)' --run-dir '$(RUN_DIR)' $(_OPT_ROUND) $(_OPT_RULE) $(_OPT_METHOD) $(_OPT_DATA) $(COMPRESS_ARGS)
	$(PY) -m export onnx --run-dir '$(RUN_DIR)' --batch '$(BATCH)'
	$(PY) -m runtime bench --run-dir '$(RUN_DIR)' --backend '$(BACKEND)' --batch '$(BATCH)' --duration '$(DURATION)' $(_OPT_THREADS)
	$(PY) -m runtime report --run-dir '$(RUN_DIR)'
	@echo "report: $(RUN_DIR)/report.md"

# Train a model on DATA into OUT/<model>/train-<data>/ (resumes a checkpoint with the same settings).
train: $(STAMP) $(_DATA_DEP)
	@test -n '$(DATA)' || { echo "error: make train needs DATA=fashion-mnist or DATA=<folder>" >&2; exit 1; }
	$(_LAUNCH) compress train --model '$(MODEL)' --weights '$(WEIGHTS)' --data '$(DATA)' --epochs '$(EPOCHS)' \
		--out '$(TRAIN_DIR)' $(_OPT_EVAL) $(TRAIN_ARGS)
	@echo "weights: $(TRAIN_DIR)/model.safetensors (make export MODEL=$(MODEL) WEIGHTS=$(TRAIN_DIR)/model.safetensors DATA=$(DATA))"

# Fine-tune the compressed model of OUT/<model>/<method> (written by make export) on DATA.
finetune: $(STAMP) $(_DATA_DEP)
	@test -n '$(DATA)' || { echo "error: make finetune needs DATA=fashion-mnist or DATA=<folder>" >&2; exit 1; }
	$(_LAUNCH) compress finetune --run-dir '$(RUN_DIR)' --data '$(DATA)' --epochs '$(_FT_EPOCHS)' $(_OPT_EVAL) $(TRAIN_ARGS)

# TensorRT engines from the ONNX files `make export` wrote (run on the target GPU / Jetson).
engine: $(STAMP)
	@test -f '$(RUN_DIR)/model.onnx' || { echo "$(RUN_DIR)/model.onnx is missing; run make export MODEL=$(MODEL) METHOD=$(METHOD) first"; exit 1; }
	$(PY) -m export engine --run-dir '$(RUN_DIR)' --precision '$(PRECISION)' $(ENGINE_ARGS)

# The default suite: everything but slow accuracy runs. Timing-sensitive (serial) tests first, alone in one
# process; then the rest on 2 xdist workers (this is a 2-core machine). Exit code 5 (none selected) passes.
test: $(STAMP) data
	$(PY) -m pytest -m "serial and not slow" -p no:cacheprovider || [ $$? -eq 5 ]
	$(PY) -m pytest -m "not serial and not slow" -n 2 --dist loadfile -p no:cacheprovider || [ $$? -eq 5 ]

test-all: $(STAMP) data
	$(PY) -m pytest -p no:cacheprovider

$(TYPESTUBS)/.installed: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --target '$(TYPESTUBS)' '$(TRT_STUBS)'
	@# The generated 10.13 stubs have two syntax errors (a parameter named `in`, a non-default after defaults).
	sed -i -E 's/(\(self: IPluginV3, |, )in: list\[/\1in_: list[/; s/channel_axis: int\) -> IScaleLayer/channel_axis: int = ...) -> IScaleLayer/' \
		'$(TYPESTUBS)/tensorrt_bindings/tensorrt.pyi'
	@touch $@

lint: $(STAMP) $(TYPESTUBS)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy export/tensorrt runtime/trt_runner.py
	$(VENV)/bin/hadolint docker/Dockerfile.x86 docker/Dockerfile.jetson

bench: $(STAMP)
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-only

clean:
	rm -rf $(OUT)
