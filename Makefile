# Two commands set everything up on a fresh machine:
#   make repro   create .venv if missing, install the project, run `dvc repro`
#   make test    the same set-up plus the test extras, then pytest
#   make setup   only the set-up (e.g. before `dvc pull`)
#   make serve   the web app over the trained models: http://127.0.0.1:8000
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Make the venv's python the `python` that dvc.yaml's commands run.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro serve test bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --progress-bar off -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]'
	touch $@

setup: $(VENV)/.installed

repro: $(VENV)/.installed
	$(BIN)/dvc repro

# Draw a digit in the browser; SERVE_ARGS="--onnx --port 8080" passes options.
serve: $(VENV)/.installed
	$(BIN)/python -m mnist_dvc.serve $(SERVE_ARGS)

# -n auto: one pytest-xdist worker per CPU core.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/epoch_speed.py --memory

clean-venv:
	rm -rf $(VENV)
