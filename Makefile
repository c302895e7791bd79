# Everything a fresh machine needs: `make demo` and `make test` each build the virtualenv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed compiles its ops at first use; keep the builds with the venv so they happen once.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export DS_ACCELERATOR ?= cpu
# The tested deepspeed range, read from setup.cfg's install_requires (declared once; dpo-ds checks it at start-up).
DEEPSPEED_REQ := $(shell sed -n 's/^[[:space:]]*\(deepspeed[<>=].*\)$$/\1/p' setup.cfg)

.PHONY: install test-deps demo test test-fast clean

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

clean:
	rm -rf $(VENV) demo_runs
