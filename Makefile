# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# The CPU wheel of torch lies in /opt/wheels on our machines; elsewhere pip's own index is used.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test lint dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp file: the environment is rebuilt when the package's declared dependencies change.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements-peers.txt
	$(PIP) install $(FIND_LINKS) "$(TORCH)"
	$(PIP) install $(FIND_LINKS) -e ".[dev]"
	$(PIP) install $(FIND_LINKS) --no-deps -r requirements-peers.txt
	touch $@

dev: $(VENV)/.installed

demo: dev
	$(BIN)/advtrain train --out runs/demo
	$(BIN)/advtrain evaluate runs/demo --html runs/demo/report.html --json runs/demo/report.json

# ruff (lint and format check) on the whole tree, mypy on the package: zero findings.
lint: dev
	$(BIN)/ruff check advtrain tests bench
	$(BIN)/ruff format --check advtrain tests bench
	$(BIN)/mypy

test: lint
	@if [ "$$CI" = true ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
	# two workers, each file on one of them (its module fixtures built once); the suite pins torch
	# to one thread per process, so the figures do not depend on how many workers there are
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

bench: dev
	$(BIN)/python bench/pgd_speed.py

clean:
	rm -rf $(VENV) runs build *.egg-info
