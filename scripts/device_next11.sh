#!/usr/bin/env bash
# Next session, call C (1 GPU, ~5 min, no carry): issue #4's Triton GEMM side-by-side (the port as
# shipped vs the sweep kernel that ran 821 TFLOP/s at N2112 K7168), the grouped FP8 GEMM's GPU check
# and its bench against the per-expert loop (the training path's next step, notes-train.md).
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout -k 5 120 python3 scripts/fp8_gemm_sweep.py --variants prod,ptr64x128s3 \
  --budget 90 --json "$OUT/fp8_gemm_sweep.json" > "$OUT/sweep.log" 2>&1; el "sweep rc=$?"; tail -8 "$OUT/sweep.log"
gpu_pytest pytest_grouped.log 150 tests/kernels/test_fp8_grouped.py -k gpu_compiled
timeout -k 5 120 python3 -m moeray.cli bench kernels --only fp8_gemm_grouped --tag grouped > "$OUT/grouped.log" 2>&1
el "grouped bench rc=$?"; grep "fp8_gemm_grouped\|ceilings" "$OUT/grouped.log"
cp benchmarks/results/kernels-*-grouped.json "$OUT/" 2>/dev/null
# issue 6: where a batch-1 decode step's 3.5 ms goes (87 us floor; notes-engine.md)
timeout -k 5 150 python3 scripts/engine_step_profile.py --preset small --batch 1 --out "$OUT" > "$OUT/engine_step.log" 2>&1
el "engine step profile rc=$?"; tail -6 "$OUT/engine_step.log"
