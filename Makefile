# Everything runs from a virtual environment in .venv, made on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STRATEGIES ?= standard,mixed_precision,tta,ensemble,tta_ensemble

.PHONY: install demo train test lint clean compare mlflow-ui

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The torch pair this machine class serves from disk, installed first and pinned for the rest.
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

runs/digits/fold_4/weights/best.pt: | $(STAMP)
	$(VENV)/bin/ml-infer-train data=digits folds=5

train: runs/digits/fold_4/weights/best.pt

demo: train
	$(PY) -m ml_infer -m strategy=$(DEMO_STRATEGIES)

compare: train
	$(PY) -m ml_infer -m +experiment=compare_all

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db --host 127.0.0.1 --port 5000

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check ml_infer tests scripts
	$(VENV)/bin/ruff format --check ml_infer tests scripts

clean:
	rm -rf outputs runs
