# Everything a fresh machine needs: `make demo` and `make test` each build the virtualenv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed compiles its ops at first use; keep the builds with the venv so they happen once.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export DS_ACCELERATOR ?= cpu
# The tested deepspeed range, read from setup.cfg's install_requires (declared once; dpo-ds checks it at start-up).
DEEPSPEED_REQ := $(shell sed -n 's/^[[:space:]]*\(deepspeed[<>=].*\)$$/\1/p' setup.cfg)

# The lowest declared version of each package in FLOOR_PACKAGES, read from setup.cfg's `>=` bounds: `make test-floor`
# installs exactly these, so the declared floors are the tested ones.
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_PACKAGES := torch|transformers|deepspeed|peft|accelerate|numpy
FLOOR_PINS := $(shell sed -n -E 's/^[[:space:]]*($(FLOOR_PACKAGES))>=([^,[:space:]]+).*$$/\1==\2/p' setup.cfg)
# One distributed run at the floors: train with checkpoints, stop by a signal, resume bitwise, export, convert.
FLOOR_RUN := tests/test_checkpoint.py -k "signal_checkpoints_and_resume or convert_round_trip"

.PHONY: install test-deps demo test test-fast test-floor clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel where no torch is present (a bare `torch` would pull a multi-GB CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	# deepspeed is a source package whose setup imports torch: build it against the torch above.
	$(PY) -m pip install -q setuptools wheel
	$(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED_REQ)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dpo_ds.demo

# The Slurm tests run a real slurmctld + 2 slurmd on 127.0.0.1: Debian's slurm-wlm and munge (as root).
test-deps:
	bash .ci/install_slurm.sh

test: $(STAMP) test-deps
	$(PY) -m pytest -q tests

# The unit tests alone (pytest.ini's markers; no process started, no Slurm needed): a couple of minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit tests

# A fresh venv at the floors (the torch floor is PyPI's CUDA build, a ~3 GB download that runs on the CPU),
# then the unit tests and FLOOR_RUN in it.
test-floor: export TORCH_EXTENSIONS_DIR = $(CURDIR)/$(FLOOR_VENV)/torch_extensions
test-floor:
	rm -rf $(FLOOR_VENV)
	python3 -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q setuptools wheel $(filter torch==%,$(FLOOR_PINS))
	$(FLOOR_PY) -m pip install -q --no-build-isolation $(FLOOR_PINS) -e '.[test]'
	$(FLOOR_PY) -m pip list 2>/dev/null | grep -iE '^($(FLOOR_PACKAGES)) '
	$(FLOOR_PY) -m pytest -q -m unit tests
	$(FLOOR_PY) -m pytest -q $(FLOOR_RUN)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) demo_runs
