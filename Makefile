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
# Extra flags for `python -m compress run` (e.g. COMPRESS_ARGS="--exclude 'layer1.*'").
COMPRESS_ARGS ?=

# Run directory: OUT/<model>/<method>; a factory MODEL=path/to/file.py:fn is named file.fn.
_FACTORY  := $(findstring :,$(MODEL))
_MODEL_NAME := $(if $(_FACTORY),$(basename $(notdir $(firstword $(subst :, ,$(MODEL))))).$(lastword $(subst :, ,$(MODEL))),$(MODEL))
RUN_DIR  := $(OUT)/$(_MODEL_NAME)/$(METHOD)

_OPT_ROUND  := $(if $(ROUND_TO),--round-to $(ROUND_TO),)
_OPT_RULE   := $(if $(RANK_RULE),--rank-rule $(RANK_RULE),)
_OPT_THREADS := $(if $(THREADS),--threads $(THREADS),)

.PHONY: help venv export test test-all lint bench clean

help:
	@echo "make export MODEL=resnet34 [METHOD=tucker2|svd|tai|cp] [RATIO=4] [WEIGHTS=auto|imagenet|random|path]"
	@echo "            [BATCH=1] [OUT=artifacts] [BACKEND=ort|torch] [DURATION=10] [ROUND_TO=8] [RANK_RULE=uniform|evbmf|energy]"
	@echo "make test   run the test suite (CPU; GPU/TensorRT/Jetson tests skip with a reason)"
	@echo "make lint   ruff check + format check"

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

# The default suite: everything but slow accuracy runs; 2 xdist workers (this is a 2-core machine).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -n 2 --dist loadfile -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-only

clean:
	rm -rf $(OUT)
