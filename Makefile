# `make demo`, `make test`, `make docs` and `make lint` each install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: demo test test-arviz1 docs lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

$(LINT_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[lint]"
	touch $(LINT_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ppl-vae fit --model gaussian_mlp

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the documentation site (guides + API reference from the docstrings) in site/; warnings are errors
docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# static checks (settings in pyproject.toml); formatting is not checked here
lint: $(LINT_STAMP)
	$(BIN)/ruff check ppl_vae tests
	$(BIN)/ruff format --check ppl_vae tests benchmarks
	$(BIN)/mypy ppl_vae

# ArviZ 1.x needs Python >= 3.12 (the main venv's torch is for 3.11): its export layer in a second venv
test-arviz1:
	bash .ci/arviz1

clean:
	rm -rf $(VENV) .venv-arviz1 site runs .pytest_cache
