# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/streamer demo

# Two test processes (one per core): most tests wait on brokers, worker processes and rebalances,
# so two run in about the wall time of one. Tests in one file stay in one process.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check streamer tests

bench: install
	$(BIN)/streamer bench compare --sweep --threads 1 --repeat 2 --out bench-results/compare

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
