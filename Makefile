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

.PHONY: demo test test-slow test-all bench install clean gpu-check wheelhouse

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
	$(VENV)/bin/r1fast demo $(DEMO_ARGS)

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

# The GPU proof (issue #18, docs/GPU.md): install offline from WHEELHOUSE (optional), build the
# CUDA extension, run the GPU tests and the benchmarks, each stage time-limited, results written
# stage by stage into RESULTS. Needs no network and no .venv: it uses .venv's python when there
# is one, else $(PYTHON). Without CUDA it runs the dry mode (tiny shapes, Triton interpreter).
RESULTS ?= gpu-check-results
WHEELHOUSE ?=
GPU_CHECK_ARGS ?=
GPU_CHECK_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check:
	$(GPU_CHECK_PY) scripts/gpu_check.py --results "$(RESULTS)" \
	  $(if $(WHEELHOUSE),--wheelhouse "$(WHEELHOUSE)") $(GPU_CHECK_ARGS)

# Wheels of the dependencies a GPU machine lacks, for an offline install there (git-ignored
# folder; carry it with the checkout). --no-deps: torch/Triton come with the machine.
PYTHON_VERSION ?= 3.12
PLATFORM ?= manylinux2014_x86_64
# pinned to the versions whose offline install was checked together (math-verify 0.9.0 needs
# latex2sympy2_extended 1.11.0 exactly)
WHEELHOUSE_PKGS ?= megatron-core==0.16.1 liger-kernel==0.8.5 math-verify==0.9.0 \
	latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 psutil==7.2.2

wheelhouse:
	@test -n "$(WHEELHOUSE)" || { echo "usage: make wheelhouse WHEELHOUSE=<dir>" >&2; exit 2; }
	$(GPU_CHECK_PY) -m pip download --only-binary=:all: --no-deps \
	  --python-version $(PYTHON_VERSION) --implementation cp --platform $(PLATFORM) \
	  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
	  -d "$(WHEELHOUSE)" $(WHEELHOUSE_PKGS)
