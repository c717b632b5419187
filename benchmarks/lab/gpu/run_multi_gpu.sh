#!/usr/bin/env bash
# Several GPUs (written for 2; NOT RUN YET): flashpatch under openpi's FSDP mesh, kvax and cuDNN vs the
# original, forward/gradient agreement and a training-step timing. Same set-up as run_all.sh: run from
# the repository root with the kvax and jax-triton wheels in .whl/; logs and JSON under $OUT.
# Extra arguments go to multi_gpu.py (e.g. --depth 6 --batch 4 if the default step runs out of time or memory).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt"
echo "== multi_gpu (limit 570s)"
timeout 570 python3 benchmarks/lab/gpu/multi_gpu.py --out "$OUT" --budget 480 "$@" > "$OUT/multi_gpu.log" 2>&1
echo "exit $?"
tail -n 20 "$OUT/multi_gpu.log"
