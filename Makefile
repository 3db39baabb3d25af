# Quick start: `make train` (set up, then train the report's model on KMNIST) and `make test`.
DATA ?= ../shared/data
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test

setup: .venv/.kmnist-setup

.venv/.kmnist-setup: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

train: setup
	.venv/bin/kmnist train --data-dir $(DATA) $(ARGS)

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)
