#!/usr/bin/env bash
# openpi's own models and the attention core on the H200, through `python -m flashpatch.bench`.
# Run from the repository root on the device machine, with (both ignored, carried):
#   .whl/         jaxtyping 0.2.36, beartype 0.19.0, ml_collections 1.0.0, augmax 0.4.1 (openpi's model code
#                 needs them; the image has newer jaxtyping, which openpi's array_typing does not import with)
#   .openpi/src/  openpi's src/ folder (git archive of github.com/Physical-Intelligence/openpi)
#   .carry/dew/   (optional) dew-flash-attn's FA3 library and Python, from benchmarks/lab/gpu/carry_fa3.sh
# Usage: bash benchmarks/lab/gpu/openpi_h200.sh STEP...   (logs and results under $OUT/<step>)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/.carry/dew PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c 'import importlib.metadata as m, platform; print("python", platform.python_version()); [print(n, m.version(n)) for n in ("jax","jaxlib","flax","optax","numpy","jaxtyping","beartype","torch","transformers","nvidia-cudnn-cu13")]'
  python3 -c 'import dew_flash_attn as d; print("dew_flash_attn", d.__file__, d.ARCHITECTURES)' || echo "dew_flash_attn not importable"
  git log --oneline -1 2>/dev/null; git status --short 2>/dev/null | head -5
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
bench() {  # bench NAME SECONDS ARGS...: one bench run under a hard time limit
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): python3 -m flashpatch.bench $*"
  timeout "$limit" python3 -m flashpatch.bench --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name exit $?"; tail -n 30 "$OUT/$name.log"
}
openpi=(--scenarios openpi --openpi-src .openpi/src --repeats 5 --case-seconds 4)
for step in "$@"; do
  case $step in
    train_pi0) bench train_pi0 560 "${openpi[@]}" --backends auto --openpi-cases pi0_train,pi0_sample,pi05_sample --budget-s 520 ;;
    train_pi05) bench train_pi05 560 "${openpi[@]}" --backends auto --openpi-cases pi05_train,pi0_fast_sample --budget-s 520 ;;
    train_long) bench train_long 400 "${openpi[@]}" --backends auto,cudnn --openpi-cases pi0_long_train --budget-s 360 ;;
    core_b2) bench core_b2 230 --scenarios core --core-batch 2 --core-sizes 1024,1536,2048,3072,4096 --backends cudnn,cudnn_split,xla,auto --budget-s 200 ;;
    core_b32) bench core_b32 120 --scenarios core --core-batch 32 --core-sizes 870 --backends cudnn,cudnn_split,auto --budget-s 100 ;;
    core_b8) bench core_b8 170 --scenarios core --core-batch 8 --core-sizes 768,1024,1280 --backends cudnn,cudnn_split,xla,auto --budget-s 140 ;;
    band_pi0) bench band_pi0 560 "${openpi[@]}" --backends cudnn,cudnn_split,xla,auto --openpi-cases pi0_train --openpi-batch 8 --budget-s 520 ;;
    backends_b32) bench backends_b32 450 "${openpi[@]}" --backends cudnn,xla --openpi-cases pi0_train --no-openpi-grad-check --budget-s 400 ;;
    gpu_tests) echo "== gpu_tests"; timeout 300 python3 -m pytest -q -m gpu -x tests/test_backend_conformance.py -k "flash or cudnn" \
        > "$OUT/gpu_tests.log" 2>&1; echo "== gpu_tests exit $?"; tail -n 15 "$OUT/gpu_tests.log" ;;
    flash_core) bench flash_core_b32 110 --scenarios core --core-batch 32 --core-sizes 870 --backends flash,cudnn_split,cudnn --budget-s 95
      bench flash_core_b2 100 --scenarios core --core-batch 2 --core-sizes 4096 --backends flash,cudnn_split,cudnn --budget-s 85 ;;
    flash_band) bench flash_band 200 --scenarios core --core-batch 8 --core-sizes 768,1024,1280 --backends flash,cudnn_split,cudnn --budget-s 170 ;;
    flash_core_16k) bench flash_core_16k 200 --scenarios core --core-batch 4 --core-sizes 16384 --backends flash,cudnn_split --budget-s 170 ;;
    core_16k) bench core_16k 260 --scenarios core --core-batch 4 --core-sizes 16384 --backends flash,pallas,cudnn_split --budget-s 230 ;;
    gpu_tests_new) echo "== gpu_tests_new"; timeout 215 python3 -m pytest -q -m gpu -p no:cacheprovider -k "flash or pallas" \
        tests/test_backend_conformance.py tests/test_gpu_models.py > "$OUT/gpu_tests_new.log" 2>&1
      echo "== gpu_tests_new exit $?"; tail -n 25 "$OUT/gpu_tests_new.log" ;;
    pallas_16k) echo "== pallas_16k"; timeout 165 python3 benchmarks/lab/gpu/pallas_sweep.py --shapes 4x16384 --budget 150 \
        > "$OUT/pallas_16k.log" 2>&1; echo "== pallas_16k exit $?"; tail -n 30 "$OUT/pallas_16k.log" ;;
    train_fast) bench train_fast 200 "${openpi[@]}" --backends auto --openpi-cases pi0_fast_train --no-openpi-grad-check --repeats 4 --budget-s 185 ;;
    train_pi0_flash) bench train_pi0_flash 230 "${openpi[@]}" --backends auto --openpi-cases pi0_train --no-openpi-grad-check --repeats 4 --budget-s 210 ;;
    train_long_flash) bench train_long_flash 180 "${openpi[@]}" --backends auto --openpi-cases pi0_long_train --no-openpi-grad-check --repeats 4 --budget-s 160 ;;
    pallas) echo "== pallas"; timeout 150 python3 benchmarks/lab/gpu/pallas_sweep.py --quick --budget 120 > "$OUT/pallas_sweep.log" 2>&1
      echo "== pallas exit $?"; tail -n 30 "$OUT/pallas_sweep.log" ;;
    pallas_steps) bench pallas_steps 420 "${openpi[@]}" --backends pallas --openpi-cases pi0_train,pi0_long_train --no-openpi-grad-check --repeats 4 --budget-s 400 ;;
    pallas_fast_grad) bench pallas_fast_grad 420 "${openpi[@]}" --backends pallas --openpi-cases pi0_fast_train --repeats 4 --budget-s 400 ;;
    pallas_huge) bench pallas_huge 300 "${openpi[@]}" --backends pallas --openpi-cases pi0_huge_train --no-openpi-grad-check --repeats 3 --budget-s 280 ;;
    pallas_870) echo "== pallas_870"; timeout 150 python3 benchmarks/lab/gpu/pallas_sweep.py --shapes 32x870 --budget 135 \
        > "$OUT/pallas_870.log" 2>&1; echo "== pallas_870 exit $?"; tail -n 30 "$OUT/pallas_870.log" ;;
    gpu_tests_rest) echo "== gpu_tests_rest"; timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=line \
        -k "flash or pallas" tests/test_gpu_models.py tests/test_backend_conformance.py \
        > "$OUT/gpu_tests_rest.log" 2>&1; echo "== gpu_tests_rest exit $?"; tail -n 25 "$OUT/gpu_tests_rest.log" ;;
    conf_f32) echo "== conf_f32"; timeout 200 python3 -m pytest -v -m gpu -p no:cacheprovider -rf --tb=line \
        -k "(pallas or flash) and float32" tests/test_backend_conformance.py > "$OUT/conf_f32.log" 2>&1
      echo "== conf_f32 exit $?"; tail -n 8 "$OUT/conf_f32.log" ;;
    gpu_models) echo "== gpu_models"; FLASHPATCH_RESULTS_DIR="$OUT/gpu_models" timeout 560 python3 -m pytest -v -m gpu \
        -p no:cacheprovider -rf --tb=line -k "flash or pallas" tests/test_gpu_models.py > "$OUT/gpu_models.log" 2>&1
      echo "== gpu_models exit $?"; tail -n 14 "$OUT/gpu_models.log" ;;
    core_pallas) for shape in 32:870 2:4096; do
        bench "core_pallas_b${shape%%:*}" 160 --scenarios core --core-batch "${shape%%:*}" --core-sizes "${shape##*:}" \
          --backends pallas,cudnn_split,flash,cudnn --budget-s 140; done ;;
    train_pi05_flash) bench train_pi05_flash 300 "${openpi[@]}" --backends auto --openpi-cases pi05_train --no-openpi-grad-check --repeats 4 --budget-s 280 ;;
    chain_profile) echo "== chain_profile (per layer of an 18-layer scan, as openpi's stack calls attention)"
      timeout 240 python3 benchmarks/lab/gpu/split_profile.py --out "$OUT/chain_profile" --budget 210 --layers 18 \
        --shapes 32x870,2x4096 --variants einsum,pallas_attend_only,pallas_attend_fill,flashpatch_pallas,pallas_stack_cond,flash_attend_only,flash_attend_fill,flashpatch_flash,flash_stack_cond \
        > "$OUT/chain_profile.log" 2>&1; echo "== chain_profile exit $?"; tail -n 12 "$OUT/chain_profile.log" ;;
    pallas_mha) echo "== pallas_mha (beside JAX's own Pallas mha, four tilings, and plain causal)"
      timeout 185 python3 benchmarks/lab/gpu/pallas_sweep.py --shapes 2x4096,32x870 --configs sm90-128x64 --budget 160 \
        > "$OUT/pallas_mha.log" 2>&1; echo "== pallas_mha exit $?"; tail -n 24 "$OUT/pallas_mha.log" ;;
    train_huge) bench train_huge 400 "${openpi[@]}" --backends auto --openpi-cases pi0_huge_train --no-openpi-grad-check --budget-s 360 ;;
    fit) bench fit 585 "${openpi[@]}" --backends auto --openpi-cases pi0_fit --openpi-fit-prompts 7424,15616,31744 --repeats 2 --budget-s 470 ;;
    *) echo "unknown step $step" ;;
  esac
done
