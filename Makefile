# Every target creates and uses .venv by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dsk-setup

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU wheel of torch first: an unpinned torch would pull a CUDA build of several GB
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,profile]"
	# compile the C++ CPU kernels (~1-3 min once, cached) now rather than inside the first test or training run;
	# where one cannot build, its PyTorch path runs (one notice line)
	$(BIN)/python -m dsk.extension dsk.model.norm dsk_moe.kernels dsk_mla.kernels
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf runs/quickstart
	$(BIN)/dsk train recipes/quickstart.toml --run-dir runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check dsk plugins tests bench
	$(BIN)/ruff format --check dsk plugins tests bench

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
