#!/usr/bin/env bash
# Rehearse the GPU machine's software stack on a CPU machine, before device time is spent.
#
# The lent GPU machines (docs/GPU.md) run Python 3.12, torch 2.11+cu130, Triton 3.6 and
# transformers 5.17, with no network and no megatron-core, liger-kernel or datasets. CI and the
# development venv run Python 3.11 and torch 2.13 (CPU), so an API that torch 2.11 or Triton 3.6
# lacks would first show on the GPU, in the one short run a session gets. This script builds
# that stack here (PyPI's torch 2.11 wheel is a CUDA build; it imports and runs on a CPU), ships
# the missing packages the way the device gets them (`make wheelhouse`, then pip --no-index
# --no-deps), and runs in a clean clone of HEAD:
#   1. `make gpu-check` (dry mode: tiny shapes, Triton 3.6's interpreter, every stage);
#   2. the GPU stages' test files (scripts/gpu_check_plan.py SMOKE_TESTS, GPU_TESTS), whose CPU cases run;
#   3. the sm_90 compile of every Triton kernel with Triton 3.6 (bench/kernel_resources.py).
# NumPy stays below 2.4 here: Triton 3.6's interpreter cannot run with 2.4+ (the device has
# 2.5 and runs no interpreter).
#
# usage: scripts/rehearse_gpu_image.sh WORKDIR      (needs ~6 GB of disk and a network)
#   PYTHON312=<python3.12>   the interpreter for the venv (default: python3.12 on PATH)
# Exit status: 0 when all three steps pass; results and logs are left in WORKDIR.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 WORKDIR   (PYTHON312=<python3.12> to pick the interpreter)" >&2
  exit 2
fi
work=$(mkdir -p "$1" && cd "$1" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
py312=${PYTHON312:-python3.12}
if ! "$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "rehearse: PYTHON312=$py312 is not a Python 3.12 interpreter (the GPU image's)" >&2
  exit 2
fi
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
  echo "rehearse: WARNING: uncommitted changes in $root are not rehearsed (a clone of HEAD is)" >&2
fi

venv=$work/venv
py=$venv/bin/python
# The image's versions (KINDS.md's pip list), NumPy aside (see above).
image_pkgs=(torch==2.11.0 "numpy<2.4" transformers==5.17.0 tokenizers==0.23.2
            safetensors==0.8.0 huggingface_hub==1.33.0 pytest pytest-timeout hypothesis
            jinja2 rich tqdm tensorboard matplotlib sympy ninja)
if [ ! -x "$py" ]; then
  echo "rehearse: building $venv (torch 2.11 with its CUDA libraries, ~5 GB)"
  "$py312" -m venv "$venv"
  { "$py" -m pip install -q --upgrade pip && "$py" -m pip install -q "${image_pkgs[@]}"; } \
    > "$work/venv.log" 2>&1 || { cat "$work/venv.log"; rm -rf "$venv"; exit 1; }
fi
"$py" -c 'import torch, triton; print("rehearse: torch", torch.__version__, "triton", triton.__version__)'

clone=$work/clone
rm -rf "$clone" "$work/wheelhouse" "$work/results"
git clone -q "$root" "$clone"
make -C "$clone" -s wheelhouse WHEELHOUSE="$work/wheelhouse" PYTHON="$py" >/dev/null
# What the device's install stage runs (scripts/gpu_check.py stage_install), for real here.
pipi=("$py" -m pip install -q --no-index --no-deps --no-build-isolation
      --disable-pip-version-check --find-links "$work/wheelhouse")
{ "${pipi[@]}" "$work/wheelhouse"/*.whl && "${pipi[@]}" -e "$clone"; } > "$work/install.log" 2>&1 \
  || { cat "$work/install.log"; exit 1; }

status=0
echo "rehearse: 1/3 make gpu-check (dry)"
make -C "$clone" gpu-check PYTHON="$py" RESULTS="$work/results" WHEELHOUSE="$work/wheelhouse" > "$work/gpu_check.out" 2>&1 \
  || { status=1; echo "rehearse: gpu-check FAILED (see $work/gpu_check.out)"; }
grep -E '^\| [a-z_]+ \| (ok|failed|skipped|timeout|incomplete)' "$work/results/summary.md" || true

echo "rehearse: 2/3 the GPU stage's test files"
mapfile -t gpu_tests < <(cd "$clone" && "$py" -c \
  'import sys; sys.path.insert(0, "scripts"); from gpu_check_plan import GPU_TESTS, SMOKE_TESTS; print(*SMOKE_TESTS, *GPU_TESTS, sep="\n")')
(cd "$clone" && "$py" -m pytest -q -p no:cacheprovider -m "not slow" \
   --junitxml="$work/gpu_tests.xml" "${gpu_tests[@]}") > "$work/gpu_tests.out" 2>&1 \
  || { status=1; echo "rehearse: GPU test files FAILED (see $work/gpu_tests.out)"; }
tail -n 1 "$work/gpu_tests.out"

echo "rehearse: 3/3 sm_90 compile of every Triton kernel with this Triton"
mkdir -p "$work/resources"
(cd "$clone" && env -u TRITON_INTERPRET R1FAST_BENCH_RESULTS="$work/resources" \
   "$py" bench/kernel_resources.py) > "$work/resources.out" 2>&1 \
  || { status=1; echo "rehearse: kernel_resources FAILED (see $work/resources.out)"; }
grep -E '^spills|kernels ->' "$work/resources.out" || true

echo "rehearse: $( [ $status -eq 0 ] && echo passed || echo FAILED ); results in $work"
exit $status
