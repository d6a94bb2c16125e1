#!/usr/bin/env bash
# Session 5, call A (1 H100, ~5 min, no carry): the Triton fp8 GEMM's register fix (tl.range K loop:
# 167 vs 177 registers/thread, 3 vs 2 CTAs per SM) checked on the GPU and side by side with the
# sweep kernels, the fp8 GEMM GPU tests (incl. the occupancy test) and the grouped GEMM's check.
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | head -1
gpu_pytest pytest_fp8.log 200 tests/gpu/test_fp8_gemm_variants_gpu.py tests/gpu/test_kernels_gpu.py
gpu_pytest pytest_grouped.log 120 tests/kernels/test_fp8_grouped.py -k gpu_compiled
timeout -k 5 200 python3 scripts/fp8_gemm_sweep.py --variants prod,ptr64x128s3 \
  --budget 150 --json "$OUT/fp8_gemm_sweep.json" > "$OUT/sweep.log" 2>&1; el "sweep rc=$?"
sed -n '/^FINAL/,$p' "$OUT/sweep.log" | cut -c1-160
