# The two commands of README.md.  Both set up everything they need first (apt + .venv).
SHELL := /bin/bash
VENV ?= .venv
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/vqmoe_ds/torch_extensions
export PYTHONUNBUFFERED = 1

.PHONY: setup test demo bench gpu-check
setup:
	bash scripts/install.sh

# pytest-xdist workers, one test file each at a time (a file's module fixtures stay in one process); many tests
# start 2-rank runs, so more workers than cores only slows them.  `make test PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/python -m pytest -q tests -n $(PYTEST_WORKERS) --dist loadfile --durations=25

demo: setup
	$(VENV)/bin/python scripts/demo.py

bench: setup
	$(VENV)/bin/python bench/moe_layer.py

# on a machine with NVIDIA GPUs: kernel tests, bf16 NCCL training and resume, benchmarks (scripts/gpu_check.py)
gpu-check: setup
	$(VENV)/bin/python scripts/gpu_check.py
