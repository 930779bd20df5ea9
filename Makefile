# One entry point for users and CI. Every target sets up the environment first (quick when done).
# VENV: the virtualenv (default .venv); PYTHON: the interpreter a new one is made with
# (Python 3.11 or 3.12; scripts/setup_env.sh picks one when unset). TEST_WORKERS: processes the
# suite runs in (pytest-xdist; each test file runs whole in one, so its fixtures are built once;
# 0: no worker processes).
VENV ?= .venv
TEST_WORKERS ?= 2
VENV_PYTHON := $(VENV)/bin/python
export VENV PYTHON

.PHONY: setup test lint benchmark demo

setup:
	bash scripts/setup_env.sh

test: setup
	$(VENV_PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 tests

lint: setup
	$(VENV)/bin/ruff check .

benchmark: setup
	$(VENV_PYTHON) benchmarks/attention.py

# demo prints the time it took (setup excluded)
demo: setup
	@start=$$(date +%s); \
	$(VENV_PYTHON) scripts/t2t_recipe.py demo && \
	$(VENV_PYTHON) scripts/s2t_recipe.py demo && \
	elapsed=$$(( $$(date +%s) - start )) && \
	echo "make demo: $$(( elapsed / 60 )) min $$(( elapsed % 60 )) s"
