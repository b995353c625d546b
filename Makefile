# Two commands for a fresh machine: `make demo` and `make test` (`make test-fast`: the quick subset).
# Both create .venv/ and install the project (with its dev and dask extras) from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: test test-fast demo docs-images lint clean

$(BIN)/.installed: pyproject.toml
	@echo "== install: $(VENV)/ with the project and its dev and dask extras (torch and the rest; about 7 min on a fresh machine, pip lists each package as it goes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev,dask]'
	touch $@

lint: $(BIN)/.installed
	@echo "== lint: ruff check and ruff format --check"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	@echo "== pytest: the whole suite (README, Tests: its time and memory)"
	$(BIN)/python -m pytest -q

test-fast: lint
	@echo "== pytest -m 'not slow': all but the tests marked slow (README, Tests)"
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(BIN)/.installed
	bash scripts/demo.sh $(DEMO)

docs-images: $(BIN)/.installed
	bash scripts/docs_images.sh

clean:
	rm -rf $(DEMO) runs
