# Two commands on a fresh machine:  make demo  (pretrain + evaluate)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
ARGS   ?=

.PHONY: demo test lint docs setup data clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev,docs]'
	touch $@

setup: $(BIN)/.installed

data:
	@bash scripts/get-fashion-mnist.sh

# MoCo v2 on Fashion-MNIST (about 10 minutes on a 2-core CPU), then kNN and linear evaluation
# and the run's HTML report (curves, retrieval grid, embedding map, kernels).
demo: setup data
	$(BIN)/mocolab pretrain --preset mocov2-fashion-mnist --out-dir $(dir $(RUN)) --run-name $(notdir $(RUN)) $(ARGS)
	$(BIN)/mocolab eval linear $(RUN)
	$(BIN)/mocolab report $(RUN)

# two processes (pytest-xdist), a test file to each at a time: about 10 minutes on 2 cores
test: setup data
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile

# Style and types of the package: ruff (lint, then the formatter's check), mypy (pyproject.toml),
# and mypy --strict on the public modules (those that define mocolab.__all__).
lint: setup
	$(BIN)/ruff check mocolab tests benchmarks examples scripts
	$(BIN)/ruff format --check mocolab
	$(BIN)/mypy
	$(BIN)/mypy --strict --follow-imports=silent $$($(BIN)/python scripts/public_modules.py)

# The documentation site (MkDocs, docs/ and mkdocs.yml) into site/, strict: a warning or a
# broken link fails. Needs the docs extra (mkdocs-material, mkdocstrings-python).
docs: setup
	NO_MKDOCS_2_WARNING=1 PYTHONPATH=. $(BIN)/python -m mkdocs build --strict

clean:
	rm -rf $(VENV) runs site .pytest_cache
