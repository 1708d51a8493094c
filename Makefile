# lvm: `make train` and `make test` are all a fresh machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

TEXT_STAMP := $(VENV)/.installed-text
SEARCH_STAMP := $(VENV)/.installed-search
EXTRAS_STAMP := $(VENV)/.installed-extras
WHEELS  := data/cache
WIKI_MEMBER := gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2

.PHONY: setup setup-text setup-extras lint format train test test-full sweep tensorboard bench bench-gpu drills search data-wiki clean

setup: $(STAMP)

# torch==2.13.0 first: it is the local CPU wheel, an unpinned torch would pull CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The optional text extra (sentence-transformers, MiniLM weights, wordllama) for lvm.corpus.build.
setup-text: $(TEXT_STAMP)

$(TEXT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,text]'
	touch $(TEXT_STAMP)

# The optional search extra (optuna) for lvm.search.
$(SEARCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,search]'
	touch $(SEARCH_STAMP)

# Every optional extra (text, sweep: joblib launcher, slurm: submitit launcher, search: optuna): what CI tests with.
setup-extras: $(EXTRAS_STAMP)

$(EXTRAS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,text,sweep,slurm,search]'
	touch $(EXTRAS_STAMP) $(TEXT_STAMP) $(SEARCH_STAMP)

# The Wikipedia excerpt inside the gensim 4.4.0 wheel (106 real articles), read straight from the
# wheel (gensim itself is not installed), embedded with MiniLM into data/wiki_minilm/, then
# diagnosed (data/wiki_minilm/diagnose/).
data-wiki: $(TEXT_STAMP)
	ls $(WHEELS)/gensim-4.4.0-*.whl >/dev/null 2>&1 || \
		$(BIN)/pip download --quiet --no-deps --only-binary=:all: gensim==4.4.0 -d $(WHEELS)
	$(BIN)/python -m lvm.corpus.build input=$$(ls $(WHEELS)/gensim-4.4.0-*.whl | head -n 1) \
		input_member=$(WIKI_MEMBER) encoder=minilm out_dir=data/wiki_minilm $(ARGS)
	$(BIN)/python -m lvm.diagnosis.diagnose data/wiki_minilm/store progress=false

# ruff (configured in pyproject.toml): lint and format check over the whole tree.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train: setup
	$(BIN)/python -m lvm.train +experiment=p6b_v2 $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-full: setup
	$(BIN)/python -m pytest -q $(ARGS)

# An Optuna search for a stable P6b v2 recipe on the built-in data (lvm.tools.search; conf/search/p6b_v2.yaml).
search: $(SEARCH_STAMP)
	$(BIN)/python -m lvm.tools.search +search=p6b_v2 $(ARGS)

sweep: setup
	$(BIN)/python -m lvm.train +experiment=p6b_v2 +sweep=gamma_clamp trainer.max_epochs=3 $(ARGS)

tensorboard: setup
	$(BIN)/tensorboard --logdir outputs --bind_all $(ARGS)

bench: setup
	$(BIN)/python -m lvm.bench $(ARGS)

# Training speed on a CUDA GPU at the original's scale (lvm.bench.gpu; says so and exits 2 without one).
bench-gpu: setup
	$(BIN)/python -m lvm.bench.gpu $(ARGS)

# The guard's fault drills and healthy controls (lvm.tools.drill): one table, one timeline per drill.
drills: setup
	$(BIN)/python -m lvm.tools.drill $(ARGS)

clean:
	rm -rf outputs/runs outputs/sweeps outputs/dev outputs/bench outputs/bench_gpu outputs/drills outputs/search .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
