#!/usr/bin/env bash
# One H100 session's checks, most important first, each step time-boxed; logs and JSON under $OUT.
# Run from the repository root with kvax and jax-triton wheels in .whl/ (see scripts/gpu/README.md).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 FLASHPATCH_RESULTS_DIR=$OUT
noise='Constant folding|This isn|If you.d like|^\s*$|%reduce|slow_operation|causal_mask and mask|Logical operators|tracemalloc'
step() {
  local name=$1 secs=$2
  shift 2
  echo "== $name (limit ${secs}s)"
  timeout "$secs" "$@" 2>&1 | grep -v -E "$noise" > "$OUT/$name.log"
  echo "exit ${PIPESTATUS[0]}"
  tail -n 12 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt"
step gpu_models 190 python3 -m pytest -q -p no:cacheprovider -W ignore -rA -k "kvax or cudnn" tests/test_gpu_models.py
step timings 150 python3 scripts/gpu/kvax_sweep.py --out "$OUT" --budget 125 --tag _c \
  --backends reference,cudnn-dense,cudnn,kvax --sections time,short --time-shapes 2x4096,32x870,2x1024
step cudnn_tests 100 python3 -m pytest -q -p no:cacheprovider -W ignore -rf -k "cudnn and not float32" \
  tests/test_cudnn_backend.py tests/test_backend_conformance.py
step kvax_conformance 75 python3 -m pytest -q -p no:cacheprovider -W ignore -rf \
  -k "kvax and bfloat16 and (masked_image or decode or suffix or arbitrary or pi0_fast)" tests/test_backend_conformance.py
