# The two ways in: `make demo` runs the main job, `make test` runs the test suite.
# Each creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned in the SAME pip command as megatron-core: alone, megatron-core's
# `torch>=2.6` would resolve to a multi-GB CUDA build (docs/DESIGN.md §5).
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.r1fast-installed
# pip's output goes here and is printed only when the install fails.
INSTALL_LOG := $(VENV)/install.log
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all bench install clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing r1fast and $(TORCH_PIN) into $(VENV) (pip log: $(INSTALL_LOG))"
	@{ $(PY) -m pip install --upgrade pip && \
	   $(PY) -m pip install "$(TORCH_PIN)" -e ".[dev]"; } > $(INSTALL_LOG) 2>&1 || \
	 { cat $(INSTALL_LOG); echo "install failed; the pip log above is in $(INSTALL_LOG)" >&2; \
	   exit 1; }
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/r1fast demo

# Default suite: everything not marked slow. pytest exits 5 when no test ran, which fails make.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_linear_logprob.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
