# One entry point for users and CI. Every target sets up the environment first (quick when done).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export VENV

.PHONY: setup test lint benchmark demo

setup:
	bash scripts/setup_env.sh

test: setup
	$(PYTHON) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

benchmark: setup
	$(PYTHON) benchmarks/attention.py

demo: setup
	$(PYTHON) scripts/t2t_recipe.py demo
	$(PYTHON) scripts/s2t_recipe.py demo
