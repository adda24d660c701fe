# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# The CPU wheel of torch lies in /opt/wheels on our machines; elsewhere pip's own index is used.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test lint dev bench clean vision-venv test-vision

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp file: the environment is rebuilt when the package's declared dependencies change.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements-peers.txt
	$(PIP) install $(FIND_LINKS) "$(TORCH)"
	$(PIP) install $(FIND_LINKS) -e ".[dev]"
	$(PIP) install $(FIND_LINKS) --no-deps -r requirements-peers.txt
	touch $@

dev: $(VENV)/.installed

# torchvision and timm (the vision extra) cannot import beside the CPU torch of $(VENV): PyPI's
# torchvision is built against CUDA torch. Their tests run in a second venv with a CUDA build of
# torch (it runs on the CPU too); on our machines pip takes every wheel from /opt.
VISION_VENV ?= .venv-vision
VISION_BIN  := $(VISION_VENV)/bin
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1
VISION_FIND_LINKS := $(FIND_LINKS) $(foreach d,/opt/pypi-more/files /opt/pypi/files,$(if $(wildcard $(d)),--find-links $(d),))
VISION_PIP := $(VISION_BIN)/python -m pip --disable-pip-version-check -q

$(VISION_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PIP) install $(VISION_FIND_LINKS) $(VISION_TORCH)
	$(VISION_PIP) install $(VISION_FIND_LINKS) -e ".[vision]" pytest pytest-timeout
	touch $@

vision-venv: $(VISION_VENV)/.installed

# Only the tests marked `vision`; the main run leaves them to this one.
test-vision: vision-venv
	$(VISION_BIN)/python -m pytest -q -p no:cacheprovider -m vision tests/test_vision_models.py

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
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not vision"
	$(MAKE) test-vision

bench: dev
	$(BIN)/python bench/pgd_speed.py

clean:
	rm -rf $(VENV) $(VISION_VENV) runs build *.egg-info
