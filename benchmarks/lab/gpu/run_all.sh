#!/usr/bin/env bash
# H100 checks, each step time-boxed; logs and JSON under $OUT. `run_all.sh` runs every step in
# order of importance; `run_all.sh STEP...` runs the named ones (a device call is at most 10 minutes).
# Run from the repository root with kvax and jax-triton wheels in .whl/ (see benchmarks/lab/gpu/README.md).
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
  tail -n 14 "$OUT/$name.log"
}
pytest_q=(python3 -m pytest -q -p no:cacheprovider -W ignore -rfE)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt"

run() {
  case $1 in
    split_timings)  # issue 9: every exact path side by side, errors and times
      step split_timings 250 python3 benchmarks/lab/gpu/kvax_sweep.py --out "$OUT" --budget 200 --tag _split \
        --backends reference,cudnn-dense,cudnn,cudnn_split,cudnn_split-cudnntail,kvax --sections correct,time \
        --correct-shapes 2x4096 --correct-backends cudnn,cudnn_split,cudnn_split-cudnntail --time-shapes 2x4096,32x870,8x1024,2x2048 ;;
    parity_shapes)  # issue 6/3: every backend's exactness at the parity model's head_dim 64, T=867 and 2048
      step parity_shapes 200 python3 benchmarks/lab/gpu/kvax_sweep.py --out "$OUT" --budget 180 --tag _parity_shapes \
        --backends reference,cudnn,cudnn_split,kvax --sections correct --correct-shapes 8x867,8x2048 --head-dim 64 ;;
    parity_float32)  # issue 6: T=2048 with openpi's einsum in float32 beside it (about 7 minutes); PARITY_SEED picks the seed
      step parity_float32 560 python3 benchmarks/parity/train_parity.py --steps 2000 --seq-len 2048 --seeds "${PARITY_SEED:-0}" \
        --backends cudnn_split --float32-run --out "$OUT/parity"
      rm -f "$OUT"/parity/*.png "$OUT"/parity/*.md ;;
    split_profile)  # issue 9: where cudnn_split's time goes
      step split_profile 160 python3 benchmarks/lab/gpu/split_profile.py --out "$OUT" --budget 140 --shapes 2x4096,32x870 ;;
    split_profile_layers)  # issue 9: the same per layer of an 8-layer scan, as openpi's stack calls it
      step split_profile_layers 200 python3 benchmarks/lab/gpu/split_profile.py --out "$OUT/layers" --budget 170 \
        --shapes 2x4096,32x870 --layers 8 --repeats 20 \
        --variants einsum,cudnn_raw_dense,core_no_cond,core_cond_remat_warnbranch,core_early_unordered,core_early_warnbranch,flashpatch_cudnn_split,flashpatch_kvax ;;
    split_order)  # issue 9: the fallback's conditional before the fast path or after it, one call per jit
      step split_order 180 python3 benchmarks/lab/gpu/split_profile.py --out "$OUT/order" --budget 150 --shapes 2x4096,32x870 \
        --variants einsum,core_no_cond,core_cond_remat,core_cond_remat_warnbranch,core_early,core_early_unordered,core_early_warnbranch,flashpatch_cudnn_split,flashpatch_kvax ;;
    split_profile_cmdbuf)  # issue 9: conditionals inside CUDA graphs (an XLA flag users can set)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+CONDITIONAL" step split_profile_cmdbuf 130 \
        python3 benchmarks/lab/gpu/split_profile.py --out "$OUT/cmdbuf" --budget 110 --shapes 2x4096,32x870 \
        --variants einsum,core_no_cond,core_trivial_cond,core_cond_remat,core_cond_remat_warnbranch,flashpatch_cudnn_split ;;
    split_times)  # issue 9's table alone: the exact paths at the two target shapes
      step split_times 120 python3 benchmarks/lab/gpu/kvax_sweep.py --out "$OUT" --budget 100 --repeats 40 --tag _split \
        --backends reference,cudnn-dense,cudnn,cudnn_split --sections time --time-shapes 2x4096,32x870 ;;
    bench_core)  # issue 5, attention core, every backend, T=1024 and 4096 (run 21); plots are rendered off the device
      step bench_core 180 python3 -m flashpatch.bench --out "$OUT/bench_core" --scenarios core \
        --core-sizes 1024,4096 --budget-s 150
      rm -f "$OUT"/bench_core/*.png "$OUT"/bench_core/*.md ;;
    bench_core16k)  # issue 5, the same at T=16384 (run 25, about 150 s)
      step bench_core16k 430 python3 -m flashpatch.bench --out "$OUT/bench_core16k" --scenarios core \
        --core-sizes 16384 --budget-s 400
      rm -f "$OUT"/bench_core16k/*.png "$OUT"/bench_core16k/*.md ;;
    bench_models)  # issue 5, whole models (18 layers at real widths), every backend (run 26, about 8 minutes)
      step bench_models 560 python3 -m flashpatch.bench --out "$OUT/bench_models" \
        --scenarios gemma,gemma_fast --train-sizes 1024,4096,8192,16384 --infer-sizes 1024,4096 \
        --cache-sizes 1024,4096 --budget-s 530
      rm -f "$OUT"/bench_models/*.png "$OUT"/bench_models/*.md ;;
    bench_ladder)  # issue 5, the training step where the einsum runs out of memory (run 27, about 3 minutes)
      step bench_ladder 330 python3 -m flashpatch.bench --out "$OUT/bench_ladder" --scenarios gemma \
        --backends cudnn,cudnn_split --train-sizes 8192,16384 --infer-sizes 1024 --budget-s 310
      rm -f "$OUT"/bench_ladder/*.png "$OUT"/bench_ladder/*.md ;;
    gpu_models)
      step gpu_models 150 "${pytest_q[@]}" -k "cudnn_split or kvax" tests/test_gpu_models.py ;;
    conformance)
      step conformance 330 "${pytest_q[@]}" -k "cudnn_split and bfloat16" tests/test_backend_conformance.py ;;
    conformance_all)
      step conformance_all 150 "${pytest_q[@]}" -k "(kvax or cudnn) and bfloat16" tests/test_backend_conformance.py ;;
    short)  # issue 3/4: pi0 sample_actions and pi0-FAST decode; kvax's per-call overhead
      step short 200 python3 benchmarks/lab/gpu/kvax_sweep.py --out "$OUT" --budget 170 --tag _short \
        --backends reference,cudnn,cudnn_split,kvax --sections short,overhead ;;
    cudnn_tests)
      step cudnn_tests 100 "${pytest_q[@]}" -k "cudnn and not float32" tests/test_cudnn_backend.py ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(split_profile split_timings conformance gpu_models short cudnn_tests conformance_all)
for s in "${steps[@]}"; do run "$s"; done
