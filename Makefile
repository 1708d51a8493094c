# lvm: `make train` and `make test` are all a fresh machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: setup train test test-full sweep tensorboard bench clean

setup: $(STAMP)

# torch==2.13.0 first: it is the local CPU wheel, an unpinned torch would pull CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: setup
	$(BIN)/python -m lvm.train +experiment=p6b_v2 $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-full: setup
	$(BIN)/python -m pytest -q $(ARGS)

sweep: setup
	$(BIN)/python -m lvm.train +experiment=p6b_v2 +sweep=gamma_clamp trainer.max_epochs=3 $(ARGS)

tensorboard: setup
	$(BIN)/tensorboard --logdir outputs --bind_all $(ARGS)

bench: setup
	$(BIN)/python -m lvm.bench $(ARGS)

clean:
	rm -rf outputs/runs outputs/sweeps outputs/dev outputs/bench .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
