# Two commands do all the set-up on a fresh machine:
#   make demo   - install into .venv, prune the embedded demo model with the paper's method, print the report
#   make test   - install into .venv, run the test-suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# the embedded demo model once it is in the tree, else a tiny random model built on the fly
DEMO_MODEL := $(if $(wildcard src/moeprune/demo/models/demo-mixtral/config.json),demo-mixtral,tiny:mixtral)

.PHONY: demo test install
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/moeprune prune $(DEMO_MODEL) --method diverse --keep 6 --out runs/demo --overwrite

test: install
	$(BIN)/python -m pytest tests
