# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv/ and install the project (with its dev and dask extras) from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: test test-fast demo docs-images lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,dask]'
	touch $@

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	bash scripts/demo.sh $(DEMO)

docs-images: $(BIN)/.installed
	bash scripts/docs_images.sh

clean:
	rm -rf $(DEMO) runs
