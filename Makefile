# The two commands of the README: `make demo` and `make test`. Both set up what they need.
SHELL := /bin/bash
VENV := .venv/bin

.PHONY: setup demo test lint bench clean-fixtures

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/python -m dev.demo

lint: setup
	$(VENV)/ruff check unionimg vm_fixtures dev bench tests
	$(VENV)/ruff format --check unionimg vm_fixtures dev bench tests
	$(VENV)/mypy
	$(VENV)/lint-imports --no-cache

test: setup lint
	UNIONIMG_REQUIRE_REAL=$${UNIONIMG_REQUIRE_REAL:-$$( [ "$${CI:-}" = true ] && echo 1 || echo 0 )} \
	  $(VENV)/pytest -q

bench: setup
	$(VENV)/python bench/provision.py
