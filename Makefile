# Quick start: `make train` and `make test` create .venv and install rode when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rode-installed

.PHONY: train test test-slow test-all lint bench install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/rode train $(ARGS)

bench: $(STAMP)
	$(BIN)/rode bench $(ARGS)

# Test workers (pytest-xdist): auto is one per CPU core, at most 4 (each imports torch);
# JOBS=0 runs the tests in this process.
# Bytecode is written (PYTHONDONTWRITEBYTECODE cleared): the workers and the `rode` processes
# the tests start then compile rode's modules and the test files once, not each.
JOBS   ?= auto
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n $(JOBS) --maxprocesses=4 \
          --dist worksteal

test: $(STAMP)
	$(PYTEST) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test-slow: $(STAMP)
	$(PYTEST) -m slow $(ARGS)

test-all: $(STAMP)
	$(PYTEST) -m "slow or not slow" $(ARGS)

clean:
	rm -rf outputs build *.egg-info .pytest_cache
