# One local virtualenv, created or refreshed whenever pyproject.toml changes; then the demo or the tests.
# torch is pinned exactly to the CPU build that lies on this disk (a range would download gigabytes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export RAY_TRAIN_V2_ENABLED := 1

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hadpo demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# the fast lane: no test that starts Ray or trains (those are marked slow; starting Ray here is an error)
test-fast: $(STAMP)
	HADPO_FORBID_RAY=1 $(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache .torch_extensions
