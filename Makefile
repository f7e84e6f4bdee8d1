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
# INPUT_SIZE: square input size of compress, export and timing (default: the model's own, 224 for most
# classifiers, 520 for segmentation, the detector's min_size); a whole number in [1, 8192].
INPUT_SIZE ?=
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
# PRECISION: export fp32 (default; int8|fp16 add `export quantize` before bench), engine fp16 (default).
PRECISION ?=
# Extra flags for `python -m export engine` (e.g. ENGINE_ARGS="--max-batch 32 --timing-cache t.cache").
ENGINE_ARGS ?=
# tensorrt-stubs for `make lint` (mypy), installed --no-deps beside the venv: the package depends on the
# `tensorrt` download stub, which cannot be installed without a GPU driver.
TRT_STUBS := tensorrt-stubs==10.13.0.35.1
TYPESTUBS := $(VENV)/typestubs
# TensorRT 11 ships no .pyi and its bindings cannot be imported without libnvinfer (tensorrt-cu12-libs fetches
# from NVIDIA's index): `make lint` checks the names the 11.x path uses against the 11.x bindings wheel instead.
TRT11_BINDINGS := tensorrt-cu12-bindings==11.4.0.106
TYPESTUBS_TRT11 := $(VENV)/typestubs-trt11
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
# Both reach `make data` (and the data loader, which reads FASHION_MNIST_DIR) through the environment: a quote,
# space or `;` in a value is data, never shell.
export FASHION_MNIST_PKG := dataset-fashion-mnist
export FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist

# Run directory: OUT/<model>/<method>; a factory MODEL=path/to/file.py:fn is named file.fn.
# export/train/finetune/engine run `python -m lowrank_deploy` (the `lowrank-deploy` console script), which
# reads every variable below from the environment as LRD_<NAME>: a value reaches it as one string, never
# through the shell (a quote, space or `;` in a value is data, and a bad value is refused before any stage
# writes). Extra-flag variables (COMPRESS_ARGS, TRAIN_ARGS, ENGINE_ARGS) are split with shlex, not a shell.
SPEEDUP ?=
LATENCY_MS ?=
DYNAMIC_BATCH ?=
# make compare: the methods run at one target (RATIO/FLOPS/SPEEDUP/LATENCY_MS) and timed in one run.
METHODS ?=
_LRD_VARS := MODEL METHOD RATIO FLOPS SPEEDUP LATENCY_MS WEIGHTS BATCH INPUT_SIZE OUT BACKEND DURATION THREADS ROUND_TO \
	RANK_RULE EXPANSION ORTHO STAGES DATA TRAIN_EPOCHS FINETUNE_EPOCHS EVAL_SAMPLES PRECISION DYNAMIC_BATCH \
	COMPRESS_ARGS EPOCHS NPROC TRAIN_ARGS ENGINE_ARGS METHODS
$(foreach v,$(_LRD_VARS),$(eval export LRD_$(v) = $$($(v))))
# The data prerequisite: installs Fashion-MNIST with apt when DATA=fashion-mnist and it is missing.
_DATA_DEP   := $(if $(filter fashion-mnist,$(DATA)),data,)

.PHONY: help venv data export compare train finetune engine test test-all lint bench docs clean

help:
	@echo "make export MODEL=resnet34 [METHOD=tucker2|svd|tai|cp|vbmf-tucker2|ljsvd|rjsvd1|rjsvd2|bijsvd|lrsd|cc]"
	@echo "            [RATIO=4 (params factor) | FLOPS=0.5 (fraction of FLOPs removed)] [WEIGHTS=auto|imagenet|random|path]"
	@echo "            [BATCH=1] [INPUT_SIZE=N] [OUT=artifacts] [BACKEND=ort|torch] [DURATION=10] [ROUND_TO=8]"
	@echo "            [RANK_RULE=uniform|param-reduction|evbmf|energy] [EXPANSION=4 ORTHO=so|srip|none STAGES=1 (vbmf-tucker2)]"
	@echo "            [DATA=fashion-mnist|folder] [TRAIN_EPOCHS=0] [FINETUNE_EPOCHS=0] [EVAL_SAMPLES=N]"
	@echo "            [PRECISION=fp32|int8|fp16 (int8/fp16: quantized copies timed and reported beside FP32)]"
	@echo "make compare MODEL=... METHODS=\"tucker2 tai auto cc\" [SPEEDUP=3 | RATIO=4 | FLOPS=0.5] [DATA=...]  one table, one timed run"
	@echo "make train  MODEL=cifar_resnet18_w0.25 DATA=fashion-mnist [EPOCHS=3] [NPROC=1] [TRAIN_ARGS=...]"
	@echo "make finetune MODEL=... METHOD=... DATA=... [FINETUNE_EPOCHS=1] [NPROC=1]  fine-tune a run directory"
	@echo "make data   install Fashion-MNIST (apt package $$FASHION_MNIST_PKG) when it is missing"
	@echo "make test   run the test suite (CPU; GPU/TensorRT/Jetson tests skip with a reason)"
	@echo "make engine MODEL=... METHOD=... PRECISION=fp16|fp32|int8 [ENGINE_ARGS=...]  TensorRT engines (needs TensorRT + GPU)"
	@echo "make lint   ruff check + format check, mypy on the TensorRT modules, hadolint on docker/"
	@echo "make docs   build the documentation site into site/ (mkdocs --strict: warnings and broken links fail)"

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST from Debian (no download from the internet): apt-get as root, else through sudo.
data:
	@if [ -f "$$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then exit 0; fi; \
	case "$$FASHION_MNIST_PKG" in [a-z0-9]*) ;; *) echo "error: FASHION_MNIST_PKG=$$FASHION_MNIST_PKG is not a Debian package name" >&2; exit 1;; esac; \
	case "$$FASHION_MNIST_PKG" in *[!a-z0-9.+-]*) echo "error: FASHION_MNIST_PKG=$$FASHION_MNIST_PKG is not a Debian package name" >&2; exit 1;; esac; \
	echo "installing $$FASHION_MNIST_PKG with apt"; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; \
	else echo "error: Fashion-MNIST is missing and this user cannot run apt-get; install the Debian package $$FASHION_MNIST_PKG (or set DATA=<folder>)" >&2; exit 1; fi; \
	{ $$SUDO apt-get install -y -q "$$FASHION_MNIST_PKG" >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q "$$FASHION_MNIST_PKG" >/dev/null; }; } \
	|| { echo "error: could not install the Debian package $$FASHION_MNIST_PKG with apt-get; install it by hand (or set DATA=<folder>)" >&2; exit 1; }

export: $(STAMP) $(_DATA_DEP)
	$(PY) -m lowrank_deploy export

# Each of METHODS at one target into OUT/<model>/<method>/, then dense + all compressed ONNX models timed in one
# interleaved run: OUT/<model>/compare.json, compare.md, compare.png.
compare: $(STAMP) $(_DATA_DEP)
	$(PY) -m lowrank_deploy compare

# Train a model on DATA into OUT/<model>/train-<data>/ (resumes a checkpoint with the same settings).
train: $(STAMP) $(_DATA_DEP)
	$(PY) -m lowrank_deploy train

# Fine-tune the compressed model of OUT/<model>/<method> (written by make export) on DATA.
finetune: $(STAMP) $(_DATA_DEP)
	$(PY) -m lowrank_deploy finetune

# TensorRT engines from the ONNX files `make export` wrote (run on the target GPU / Jetson).
engine: $(STAMP)
	$(PY) -m lowrank_deploy engine

# The default suite: everything but slow accuracy runs. Timing-sensitive (serial) tests first, alone in one
# process; then the rest on 2 xdist workers (this is a 2-core machine) with one BLAS/OpenMP thread each — two
# workers of 2 threads each oversubscribe the cores and made the big SVDs ~10× slower. Exit code 5 passes.
test: $(STAMP) data
	$(PY) -m pytest -m "serial and not slow" -p no:cacheprovider || [ $$? -eq 5 ]
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not serial and not slow" -n 2 --dist loadfile -p no:cacheprovider || [ $$? -eq 5 ]

test-all: $(STAMP) data
	$(PY) -m pytest -p no:cacheprovider

$(TYPESTUBS)/.installed: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --target '$(TYPESTUBS)' '$(TRT_STUBS)'
	@# The generated 10.13 stubs have two syntax errors (a parameter named `in`, a non-default after defaults).
	sed -i -E 's/(\(self: IPluginV3, |, )in: list\[/\1in_: list[/; s/channel_axis: int\) -> IScaleLayer/channel_axis: int = ...) -> IScaleLayer/' \
		'$(TYPESTUBS)/tensorrt_bindings/tensorrt.pyi'
	@touch $@

$(TYPESTUBS_TRT11)/.installed: $(STAMP)
	$(PY) -m pip download --disable-pip-version-check -q --no-deps -d '$(TYPESTUBS_TRT11)' '$(TRT11_BINDINGS)'
	@touch $@

lint: $(STAMP) $(TYPESTUBS)/.installed $(TYPESTUBS_TRT11)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy export/tensorrt runtime/trt_runner.py
	$(PY) -m export.tensorrt.surface $(TYPESTUBS_TRT11)/tensorrt_cu12_bindings-*.whl
	$(VENV)/bin/hadolint docker/Dockerfile.x86 docker/Dockerfile.jetson

bench: $(STAMP)
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-only

# The documentation site: the `docs` extra (MkDocs, Material, mkdocstrings) with its own stamp, then a strict
# build into site/ — a warning, a broken internal link or anchor, or a missing docstring target fails it.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev,docs]'
	@touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# OUT reaches rm as one argument (LRD_OUT from the environment): OUT="runs b" deletes exactly `runs b`.
clean:
	@test -n "$$LRD_OUT" || { echo "error: make clean needs OUT=<folder>" >&2; exit 1; }
	rm -rf -- "$$LRD_OUT"
