# nfdet: two commands do all set-up.
#   make demo   -> the whole pipeline on a generated dataset (set-up on first use)
#   make test   -> lint + the test suite without the slow cases (set-up on first use)
#   make test-all -> lint + every test, the slow ones included (what CI runs)
# Set-up creates .venv, installs torch/torchvision (pinned), nfdet (editable), detectron2 and the
# test tools, and records each step with a stamp so later runs reinstall nothing.

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
DEMO_OUT    ?= demo_output
PYTEST_ARGS ?=

.PHONY: setup demo test test-all lint clean-venv env

setup: $(VENV)/.stamp-test

$(VENV)/.stamp-venv:
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

$(VENV)/.stamp-runtime: $(VENV)/.stamp-venv requirements.txt setup.py
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.stamp-detectron2: $(VENV)/.stamp-runtime scripts/install_detectron2.sh requirements-detectron2.txt
	scripts/install_detectron2.sh $(PY)
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-detectron2 requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

env: setup
	$(PY) -m nfdet.collect_env

lint: setup
	$(VENV)/bin/ruff check nfdet tools tests

test: setup lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-all: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: setup
	$(PY) tools/run_demo.py --out $(DEMO_OUT)

clean-venv:
	rm -rf $(VENV)
