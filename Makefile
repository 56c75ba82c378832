# `make demo` runs the demo study on the built-in synthetic dataset; `make test` runs the tests.
# Both create .venv from requirements.txt when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ifndef DEMO_DIR
DEMO_DIR := multirun/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
endif
DEMO_ARGS ?= data.batch=4,8,16 threads=1 eval.fps_images=50 hydra.sweep.dir=$(DEMO_DIR)

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The headline grid norm=bn,syncbn,cbn x data.batch=4,8,16 as two concurrent sweeps into one sweep
# folder (BN+SyncBN | CBN, about equal work), one thread each: on 2 cores, two single-threaded
# processes train ~1.6x faster than one process with two threads.
demo: $(STAMP)
	$(PY) -m cbn_detect.train -m norm=bn,syncbn $(DEMO_ARGS) & bn=$$!; \
	$(PY) -m cbn_detect.train -m norm=cbn $(DEMO_ARGS) & cbn=$$!; \
	wait $$bn && wait $$cbn
	$(PY) -m cbn_detect.report $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) multirun outputs
