# The two user commands: `make demo` and `make test`. Everything installs itself into .venv.
PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= auto
# The PyTorch cross-checks (tests/benchmarks, tests/models/test_convert.py) need torch. 2.13.0 is
# pinned because pip takes a CPU build of exactly that release from the machines' local wheels;
# elsewhere PyPI's Linux wheel is a CUDA build of several GB: there pass
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU one.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test test-all venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.torch: $(VENV)/.installed Makefile
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m experiments.compare_schemes --config=experiments/configs/demo.py --workdir=runs/demo

# CNN_REQUIRE_TORCH=1: a missing torch fails the cross-checks instead of skipping them.
test: $(VENV)/.torch
	CNN_REQUIRE_TORCH=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test-all: $(VENV)/.torch
	CNN_REQUIRE_TORCH=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "slow or not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
