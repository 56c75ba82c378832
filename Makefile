# `make demo` runs the demo study on the built-in synthetic dataset; `make test` runs the tests.
# Both create .venv from requirements.txt when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= multirun/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
DEMO_GRID ?= norm=bn,syncbn,cbn data.batch=4,8,16

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cbn_detect.train -m $(DEMO_GRID) hydra.sweep.dir=$(DEMO_DIR)
	$(PY) -m cbn_detect.report $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) multirun outputs
