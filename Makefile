# Two commands set everything up on a fresh machine:
#   make repro   create .venv if missing, install the project, run `dvc repro`
#   make test    the same set-up plus the test extras, then pytest
#   make setup   only the set-up (e.g. before `dvc pull`)
#   make check   after make repro: did it rebuild exactly the committed results? (docs/reproducibility.md)
#   make predict IMAGES="a.png b.jpg"   classify your own pictures with both models
#   make serve   the web app over the trained models: http://127.0.0.1:8000
#   make best    the best recipe (>= 0.99 test accuracy) as the named experiment "best"
#   make report REVS="HEAD exp-a"   compare revisions on one page: reports/report.html (and .md)
#   make promote REV=HEAD   register REV as a model version; gate it; move the prod stage to it
#   make rollback           move the prod stage back to the version it held before
#   make notebook  run the tutorial notebook on data/processed and save it with its outputs
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Make the venv's python the `python` that dvc.yaml's commands run.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro predict serve best notebook report promote rollback check test bench bench-pipeline bench-serve bench-cluster clean-venv

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

# Stage by stage: the rebuilt outputs against the committed dvc.lock, and why any differ.
check: $(VENV)/.installed
	$(BIN)/python -m mnist_dvc.apps.check

predict: $(VENV)/.installed
	@test -n "$(IMAGES)" || { echo 'usage: make predict IMAGES="a.png b.jpg"'; exit 2; }
	$(BIN)/python -m mnist_dvc.apps.predict $(IMAGES)

# The recipe of docs/experiments.md on top of the committed (tutorial) params:
# a wider MLP, a one-cycle schedule, and shifted and turned training images.
BEST := -S 'model.hidden=[800]' -S train.epochs=30 -S train.batch_size=128 -S train.lr=0.002 \
	-S train.schedule=onecycle -S train.warmup=0.25 -S train.augment.shift=2 -S train.augment.rotate=10
best: $(VENV)/.installed
	$(BIN)/dvc exp run -n best $(BEST)

# Revisions side by side (docs/experiments.md#compare-results-at-a-glance): commits, branches,
# tags, experiment names; the first is the baseline. No REVS: HEAD against the workspace.
report: $(VENV)/.installed
	$(BIN)/python -m mnist_dvc.apps.report $(REVS) $(if $(OUT),--out $(OUT))

# The model registry (docs/registry.md): REV (commit, branch, tag, experiment) checked against the
# version in STAGE, then assigned; PROMOTE_ARGS="--force --message 'why'" overrides the gate.
STAGE ?= prod
promote: $(VENV)/.installed
	@test -n "$(REV)" || { echo 'usage: make promote REV=<commit, branch, tag or experiment>'; exit 2; }
	$(BIN)/python -m mnist_dvc.apps.promote $(REV) --stage $(STAGE) $(PROMOTE_ARGS)

rollback: $(VENV)/.installed
	$(BIN)/python -m mnist_dvc.apps.promote --rollback --stage $(STAGE) $(PROMOTE_ARGS)

# Draw a digit in the browser; SERVE_ARGS="--onnx --port 8080" passes options,
# SERVE_ARGS="--collect data/feedback/pictures" saves corrections (docs/feedback.md).
serve: $(VENV)/.installed
	$(BIN)/python -m mnist_dvc.apps.serve $(SERVE_ARGS)

$(VENV)/.installed-notebook: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[notebook]'
	touch $@

# The tutorial, top to bottom on the pipeline's data, saved with its outputs (docs/tutorial.md).
notebook: $(VENV)/.installed-notebook
	$(BIN)/python notebooks/run_tutorial.py

# -n auto: one pytest-xdist worker per CPU core; --dist loadgroup: a free worker takes the next tests
# in file order, the tests of one xdist_group (tests/conftest.py) all together, where the first one is.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto --dist loadgroup --no-loadscope-reorder

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/epoch_speed.py --memory

# Each stage's wall time and import time, and a forced `dvc repro` (docs/performance.md).
bench-pipeline: $(VENV)/.installed-test
	$(BIN)/python benchmarks/pipeline_time.py

# A burst of requests against the web app (docs/web-app.md).
bench-serve: $(VENV)/.installed-test
	$(BIN)/python benchmarks/serve_load.py

# The tune grid locally and on a loopback Dask cluster (docs/cluster.md).
bench-cluster: $(VENV)/.installed-test
	$(BIN)/python benchmarks/tune_cluster.py

clean-venv:
	rm -rf $(VENV)
