#!/usr/bin/env bash
# The checks a session with a lent GPU runs on the device machine (a bare copy of this repository with the image's
# system python: jax 0.11.2, flax, pytest; nothing can be installed there, so no pip and no .venv):
#   bash scripts/gpu_check.sh [STAGE ...]     STAGE: env tests kernels bench (default: all four, in that order)
# env:     jax / flax / device info, and that every module the later stages import imports
# tests:   tests/kernels on the compiled Pallas kernels (V4JAX_KERNEL_TEST_IMPL=pallas, read by tests/conftest.py)
# kernels: python -m bench kernels (the kernel table of docs/performance.md, GPU section)
# bench:   python -m bench train decode (MFU of the training step, decode tokens/s)
# Logs, docs/perf/results.json and docs/performance.md go to $OUT (the device tool's output folder; default
# /tmp/gpu_check). One device command may run 10 minutes: run the stages in separate calls if they do not fit,
# e.g. `bash scripts/gpu_check.sh env tests`, then `bash scripts/gpu_check.sh kernels`, then `... bench`; copy
# results.json back into docs/perf/ here and regenerate docs/performance.md with `python -m bench --render-only`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_check}"
PY="${PYTHON:-python3}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0

run() {  # run NAME CMD...: CMD's output to the terminal and $OUT/NAME.txt; remember a failure, go on
  echo "== $1: ${*:2}"
  "${@:2}" 2>&1 | tee "$OUT/$1.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $1 FAILED (exit $rc)"; status=1; }
}

env_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" - <<'EOF'
import platform

import flax
import jax

print(f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
      f"backend {jax.default_backend()}, devices {jax.devices()}")
# every module the later stages import: a missing package or a too-old flax / jax fails here, named
import bench.decode, bench.kernels, bench.train, kernels.fp4_matmul, kernels.indexer, kernels.sparse_attention  # noqa
import pytest, v4jax.model  # noqa
print("imports ok")
if jax.default_backend() != "gpu":
    raise SystemExit("no GPU backend: this script is for the device machine (jax with CUDA)")
EOF
}

stages=("$@")
[ $# -gt 0 ] || stages=(env tests kernels bench)
for s in "${stages[@]}"; do
  case "$s" in
    env) run env env_info ;;
    # fp32 matmuls outside the kernels (e.g. ragged_dot in the fp4 reference) at full precision, as on CPU: XLA's
    # GPU default for fp32 may use TF32, far from the tests' 1e-5 tolerances (the kernels ask for HIGHEST)
    tests) run tests_kernels env V4JAX_KERNEL_TEST_IMPL=pallas JAX_DEFAULT_MATMUL_PRECISION=highest \
             "$PY" -m pytest -q -p no:xdist -p no:cacheprovider --durations=10 tests/kernels ;;
    kernels) run bench_kernels "$PY" -m bench kernels ;;
    bench) run bench_train_decode "$PY" -m bench train decode ;;
    *) echo "unknown stage $s: use env, tests, kernels or bench"; exit 2 ;;
  esac
done
cp docs/perf/results.json docs/performance.md "$OUT"/ 2>/dev/null
exit $status
