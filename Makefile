# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench-smoke clean

# torch first, pinned to the CPU build on this machine's disk: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/semoe train --recipe small --nproc 2 --out runs/demo

lint: install
	$(BIN)/ruff check src tests benchmarks

# The whole suite, then the numerical comparisons (marked `numerics`) again under a second set of CPU kernels
# (AVX2 on an AVX-512 CPU, no SIMD on an AVX2 one; tests/other_kernels.py): a tolerance that holds with only
# one instruction set's kernels fails here rather than on someone else's machine.
test: install lint
	$(BIN)/pytest
	$(BIN)/python -m tests.other_kernels -m numerics

clean:
	rm -rf runs .pytest_cache
