# `make demo` runs the demo study on the built-in synthetic dataset; `make test` runs the tests;
# `make lint` checks the code with ruff (CI runs it before the tests);
# `make mutate` runs mutation testing of the numerical core (slow; not part of CI).
# Each creates .venv from requirements.txt when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ifndef DEMO_DIR
DEMO_DIR := multirun/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
endif
ifndef STUDY_DIR
STUDY_DIR := multirun/study/$(shell date +%Y-%m-%d_%H-%M-%S)
endif
DEMO_ARGS ?= norm=bn,syncbn,cbn data.batch=4,8,16 processes=2 threads=1 eval.fps_images=50 hydra.sweep.dir=$(DEMO_DIR)

.PHONY: demo study test lint format mutate venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The headline grid norm=bn,syncbn,cbn x data.batch=4,8,16, each job as 2 DDP processes (gloo) of
# one thread: SyncBN then really synchronises the two processes' batches.
demo: $(STAMP)
	$(PY) -m cbn_detect.train -m $(DEMO_ARGS)
	$(PY) -m cbn_detect.report $(DEMO_DIR)

# The small-batch study: norm=bn,syncbn,cbn,gn x 1,2,4 images per process x 3 seeds, 2 processes
# per job (conf/experiment/small_batch_study.yaml), then the report with paired differences to BN.
study: $(STAMP)
	$(PY) -m cbn_detect.train -m experiment=small_batch_study hydra.sweep.dir=$(STUDY_DIR)
	$(PY) -m cbn_detect.report $(STUDY_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

# ruff's lint rules and formatter (pyproject.toml [tool.ruff]); `make format` rewrites the files.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# mutmut over each module of tools/mutate.py's MODULES against the fast tests listed for it, one
# module at a time; prints the surviving mutants and a summary (.cache/mutate/summary.md).
# MUTATE="stats voc_ap" runs some modules only; MUTATE_ARGS=--diffs shows each survivor's diff.
MUTATE ?=
MUTATE_ARGS ?=
mutate: $(STAMP)
	$(PY) tools/mutate.py $(MUTATE_ARGS) $(MUTATE)

clean:
	rm -rf $(VENV) multirun outputs
