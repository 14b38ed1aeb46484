# kdlight: `make demo` and `make test` work on a fresh machine (they create .venv first).
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed first, pinned to a pair that works together.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# CIFAR-10: the offline archive where it exists, else the official release via torchvision.
ARCHIVE ?= ../shared/data/cifar10-jpeg.tar.gz
DATA_SOURCE ?= $(if $(wildcard $(ARCHIVE)),archive,torchvision)
DATA_ARGS := data.source=$(DATA_SOURCE) data.archive_path=$(abspath $(ARCHIVE)) $(if $(filter torchvision,$(DATA_SOURCE)),data.download=true)
PYTEST_ARGS ?=
TRAIN := $(VENV)/bin/kdlight-train
# the demo's 2 x 2 grid, trained as one fused run (one teacher forward for four students)
DEMO_GRID := "distill.temperature=[2,8]" "distill.alpha=[0.5,0.9]"
# the demo's seeds for the baseline and the grid: `make demo SEEDS=0,1,2` reports mean ± std
SEEDS ?= 0

.PHONY: help venv demo reproduce bench gpu-study notebook test lint format clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## Create .venv and install kdlight with its dev tools

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv ## The whole idea on CPU (~2 min): teacher, baseline, 2x2 T x alpha distillation, report
	$(TRAIN) experiment=teacher demo=cpu model=resnet20 trainer.max_epochs=6 $(DATA_ARGS)
	$(TRAIN) -m experiment=student_baseline demo=cpu model.width=0.5 seed=$(SEEDS) $(DATA_ARGS)
	$(TRAIN) -m experiment=distill_grid demo=cpu model.width=0.5 $(DEMO_GRID) seed=$(SEEDS) $(DATA_ARGS)
	$(VENV)/bin/kdlight-report outputs/demo

reproduce: venv ## The reference study on one GPU: teacher, baseline, 5x3 T x alpha grid, report
	$(TRAIN) experiment=teacher $(DATA_ARGS)
	$(TRAIN) experiment=student_baseline $(DATA_ARGS)
	$(TRAIN) -m experiment=distill sweep=reference_grid seed=$(SEEDS) $(DATA_ARGS)
	$(VENV)/bin/kdlight-report outputs/teacher outputs/student_baseline outputs/distill --out outputs/report

bench: venv ## Throughput of the fast path against a plain PyTorch loop (CPU or GPU); writes bench.json
	$(PY) -m kdlight.cli.bench --out bench.json

gpu-study: ## On one GPU: the benchmark and the whole reference study, fast path (scripts/gpu_study.sh)
	ARCHIVE=$(ARCHIVE) scripts/gpu_study.sh

notebook: venv ## Run the walkthrough headless on synthetic data (executed copy in notebooks/outputs/)
	mkdir -p notebooks/outputs
	cd notebooks && KDLIGHT_NOTEBOOK_SOURCE=synthetic ../$(VENV)/bin/jupyter execute walkthrough.ipynb --output=outputs/walkthrough

# Two pytest processes (pytest-xdist), each test file in one of them (its module fixtures
# made once): most tests run torch on one thread or wait on the processes they launch.
TEST_WORKERS ?= 2

test: venv ## Run the whole test suite in TEST_WORKERS processes (and list its 25 slowest tests: the suite's budget is 20 minutes on 2 cores)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

lint: venv ## Check style with ruff
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: venv ## Format the code with ruff
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

clean: ## Remove outputs and caches (keeps .venv and the data cache)
	rm -rf outputs multirun lightning_logs .pytest_cache .ruff_cache
