# lowrank-deploy: compress → export → runtime, chained.
#   make export MODEL=resnet34 [METHOD=tucker2] [RATIO=4] [WEIGHTS=auto] [BATCH=1] [OUT=artifacts]
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
RATIO    ?= 4
WEIGHTS  ?= auto
BATCH    ?= 1
OUT      ?= artifacts
BACKEND  ?= ort
DURATION ?= 10
THREADS  ?=
ROUND_TO ?=
RANK_RULE ?=
PRECISION ?= fp16
# Extra flags for `python -m export engine` (e.g. ENGINE_ARGS="--max-batch 32 --timing-cache t.cache").
ENGINE_ARGS ?=
# tensorrt-stubs for `make lint` (mypy), installed --no-deps beside the venv: the package depends on the
# `tensorrt` download stub, which cannot be installed without a GPU driver.
TRT_STUBS := tensorrt-stubs==10.13.0.35.1
TYPESTUBS := $(VENV)/typestubs
# Extra flags for `python -m compress run` (e.g. COMPRESS_ARGS="--exclude 'layer1.*'").
COMPRESS_ARGS ?=

# Run directory: OUT/<model>/<method>; a factory MODEL=path/to/file.py:fn is named file.fn.
_FACTORY  := $(findstring :,$(MODEL))
_MODEL_NAME := $(if $(_FACTORY),$(basename $(notdir $(firstword $(subst :, ,$(MODEL))))).$(lastword $(subst :, ,$(MODEL))),$(MODEL))
RUN_DIR  := $(OUT)/$(_MODEL_NAME)/$(METHOD)

_OPT_ROUND  := $(if $(ROUND_TO),--round-to $(ROUND_TO),)
_OPT_RULE   := $(if $(RANK_RULE),--rank-rule $(RANK_RULE),)
_OPT_THREADS := $(if $(THREADS),--threads $(THREADS),)

.PHONY: help venv export engine test test-all lint bench clean

help:
	@echo "make export MODEL=resnet34 [METHOD=tucker2|svd|tai|cp] [RATIO=4] [WEIGHTS=auto|imagenet|random|path]"
	@echo "            [BATCH=1] [OUT=artifacts] [BACKEND=ort|torch] [DURATION=10] [ROUND_TO=8] [RANK_RULE=uniform|evbmf|energy]"
	@echo "make test   run the test suite (CPU; GPU/TensorRT/Jetson tests skip with a reason)"
	@echo "make engine MODEL=... METHOD=... PRECISION=fp16|fp32|int8 [ENGINE_ARGS=...]  TensorRT engines (needs TensorRT + GPU)"
	@echo "make lint   ruff check + format check, mypy on the TensorRT modules, hadolint on docker/"

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

export: $(STAMP)
	$(PY) -m compress run --model '$(MODEL)' --method '$(METHOD)' --ratio '$(RATIO)' --weights '$(WEIGHTS)' \
		--batch '$(BATCH)' --run-dir '$(RUN_DIR)' $(_OPT_ROUND) $(_OPT_RULE) $(COMPRESS_ARGS)
	$(PY) -m export onnx --run-dir '$(RUN_DIR)' --batch '$(BATCH)'
	$(PY) -m runtime bench --run-dir '$(RUN_DIR)' --backend '$(BACKEND)' --batch '$(BATCH)' --duration '$(DURATION)' $(_OPT_THREADS)
	$(PY) -m runtime report --run-dir '$(RUN_DIR)'
	@echo "report: $(RUN_DIR)/report.md"

# TensorRT engines from the ONNX files `make export` wrote (run on the target GPU / Jetson).
engine: $(STAMP)
	@test -f '$(RUN_DIR)/model.onnx' || { echo "$(RUN_DIR)/model.onnx is missing; run make export MODEL=$(MODEL) METHOD=$(METHOD) first"; exit 1; }
	$(PY) -m export engine --run-dir '$(RUN_DIR)' --precision '$(PRECISION)' $(ENGINE_ARGS)

# The default suite: everything but slow accuracy runs; 2 xdist workers (this is a 2-core machine).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -n 2 --dist loadfile -p no:cacheprovider

test-all: $(STAMP)
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
	$(PY) -m mypy export/tensorrt.py runtime/trt_runner.py
	$(VENV)/bin/hadolint docker/Dockerfile.x86 docker/Dockerfile.jetson

bench: $(STAMP)
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-only

clean:
	rm -rf $(OUT)
