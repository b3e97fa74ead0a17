#!/bin/bash
# The GPU checks for a session that is lent a GPU (the `device` tool: one call, ~15 minutes of device time
# in all). Run from the repository root there: `bash benchmarks/gpu_checks.sh`. That machine's image has
# jax (CUDA), flax, optax, orbax but not grain / array-record: carry their cp312 wheels in an ignored
# folder `.whl` (see the device tool's README), as the first session did (2026-12-04, docs/PERFORMANCE.md
# "GPU mode"). Each step has its own time limit so a slow one still leaves the others' results.
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -m pip list 2>/dev/null |
  grep -iE "^(jax|jaxlib|jax-cuda1[23]-plugin|flax|optax) "; } 2>&1 | tee "$OUT/env.log"
quiet() { grep -v "^WARNING\|^I0000\|^W0000"; }
# 1. The routed experts' grouped matmul: XLA:GPU's ragged_dot is dense (E x the FLOPs); our blocked one is
#    sparse but untimed on a GPU; cuDNN's grouped GEMM behind an XLA flag is untested.
timeout 200 python3 benchmarks/gpu_mfu.py --modes bf16 --moe-impl blocked --steps 3 --warmup 1 2>&1 | quiet | tee "$OUT/blocked.log" | tail -4
XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true timeout 200 python3 benchmarks/gpu_mfu.py --modes bf16 \
  --moe-impl ragged --steps 3 --warmup 1 2>&1 | quiet | tee "$OUT/ragged_cudnn.log" | tail -4
# 2. fp8 numerics on the GPU (an inf weight gradient was seen there, not on CPU).
JAX_PLATFORMS=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fp8.py 2>&1 | tee "$OUT/fp8_tests.log" | tail -8
date
