# Two entry points from a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: demo test lint format install test-deps prometheus clean k8s

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so that the CPU wheel on disk is used (a bare `torch` pulls a CUDA build).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[lint]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moeray demo

prometheus:
	@command -v prometheus >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) || echo "warning: could not install prometheus"

# Two pytest runs: the tiers without Ray over 2 worker processes (pytest-xdist; the interpreted
# Triton kernels are single-threaded Python), then the Ray tier in one process (one local Ray
# instance for all of it).
test: $(TEST_STAMP) prometheus
	$(BIN)/python -m pytest -q -n 2 --durations=20 tests/unit tests/kernels tests/gpu
	$(BIN)/python -m pytest -q --durations=20 tests/ray

# ruff (lint and format check) and mypy, configured in pyproject.toml.
lint: $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(LINT_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info

# KubeRay manifests in k8s/, rendered from the train and serve configs (tests check they are fresh).
k8s: $(STAMP)
	$(BIN)/moeray k8s render --train-config configs/train/tiny.yaml --serve-config configs/serve/k8s.yaml --out k8s
