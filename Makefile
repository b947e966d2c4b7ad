# Everything runs from a virtual environment in .venv, made on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STRATEGIES ?= standard,mixed_precision,tta,ensemble,tta_ensemble

.PHONY: install demo train test test-fast lint clean compare mlflow-ui textures train-textures demo-textures bench screenshots

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The torch pair this machine class serves from disk, installed first and pinned for the rest.
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,timm]'
	touch $@

runs/digits/fold_4/weights/best.pt: | $(STAMP)
	$(VENV)/bin/ml-infer-train data=digits folds=5

train: runs/digits/fold_4/weights/best.pt

demo: train
	$(PY) -m ml_infer -m strategy=$(DEMO_STRATEGIES)

# The second bundled set: texture patches where flips and rotations preserve the label.
datasets/textures/test: | $(STAMP)
	$(PY) scripts/make_textures.py

textures: datasets/textures/test

runs/textures/fold_4/weights/best.pt: | datasets/textures/test
	$(VENV)/bin/ml-infer-train data=textures folds=5 epochs=15

train-textures: runs/textures/fold_4/weights/best.pt

demo-textures: train-textures
	$(PY) -m ml_infer -m data=textures strategy=standard,tta,ensemble,tta_ensemble

compare: train
	$(PY) -m ml_infer -m +experiment=compare_all

# What each strategy costs, side by side in one process (about 4 minutes here): outputs/bench/.
bench: train
	$(PY) scripts/bench.py

# docs/mlflow_*.png: the MLflow UI on a short sweep, checked and photographed in headless Chromium
# (needs Debian's chromium: apt-get install chromium).
screenshots: train
	$(PY) -m pip install --quiet -c constraints.txt -e '.[docs]'
	$(PY) scripts/mlflow_screenshots.py

mlflow-ui: $(STAMP)
	@echo "MLflow 3: open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (Model training)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db --host 127.0.0.1 --port 5000

test: $(STAMP)
	$(PY) -m pytest
	$(VENV)/bin/mypy

# The quick loop: everything but subprocess sweeps, torchrun, mlflow servers and end-to-end runs.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

lint: $(STAMP)
	$(VENV)/bin/ruff check ml_infer hydra_plugins tests scripts
	$(VENV)/bin/ruff format --check ml_infer hydra_plugins tests scripts
	$(VENV)/bin/mypy

clean:
	rm -rf outputs runs datasets
