# Two commands a new user needs: `make demo` (set up + the main job) and `make test` (set up + the test suite).
# Set-up is idempotent: each step leaves a stamp in .venv/ and reruns only when its requirements file changes;
# pip's wheel cache keeps the 8-minute mmcv build from repeating on the same machine.

PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := -c requirements/constraints.txt
STAMPS      := $(VENV)/.stamps

.PHONY: setup demo test lint clean-venv

setup: $(STAMPS)/mmattn

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)

$(STAMPS)/torch: requirements/torch.txt | $(PY)
	$(PIP) install -r requirements/torch.txt
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/build: requirements/build.txt $(STAMPS)/torch
	$(PIP) install $(CONSTRAINTS) -r requirements/build.txt
	@touch $@

# mmcv must see torch at build time (--no-build-isolation), or it silently skips its compiled ops.
$(STAMPS)/mmcv: $(STAMPS)/build
	MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install $(CONSTRAINTS) --no-build-isolation mmcv==2.1.0
	$(PY) -c "import mmcv.ops; from mmcv import _ext"
	@touch $@

$(STAMPS)/openmmlab: requirements/openmmlab.txt requirements/tests.txt $(STAMPS)/mmcv
	$(PIP) install $(CONSTRAINTS) -r requirements/openmmlab.txt -r requirements/tests.txt
	@touch $@

$(STAMPS)/mmattn: setup.py $(STAMPS)/openmmlab
	$(PIP) install $(CONSTRAINTS) --no-build-isolation --no-deps -e .
	$(PY) -c "import mmattn, mmdet.models, mmpretrain.models"
	@touch $@

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check mmattn tools tests configs

clean-venv:
	rm -rf $(VENV)
