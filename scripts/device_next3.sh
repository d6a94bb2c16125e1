#!/usr/bin/env bash
# Device call (4 GPUs, ~10 min, no carry): issue #4/#5 evidence in one machine.
#   phase 1, in parallel:
#     GPU 0    the FP8 scale-layout check (the NaN's suspected cause), the fused router, tests/gpu
#     GPU 1    `moeray bench kernels` (issue #4 numbers with the ported GEMM)
#     GPU 2,3  `moeray bench train` PP=2 x EP=1, 10 steps: is the FP8 NaN gone?
#   phase 2: `moeray bench train` PP=2 x EP=2 on all four GPUs (issue #5's evidence run)
set -u
source "$(dirname "$0")/device_env.sh"
touch /tmp/t0  # results written after this are this run's
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
( CUDA_VISIBLE_DEVICES=0 timeout -k 5 200 python3 -m pytest -q -s -p no:cacheprovider -m gpu \
    tests/kernels/test_fp8_training_shapes.py tests/kernels/test_gate.py > "$OUT/pytest_fp8_shapes.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 200 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu \
    > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_gpu.log" ) &
( CUDA_VISIBLE_DEVICES=1 timeout -k 5 330 python3 -m moeray.cli bench kernels > "$OUT/kernels.log" 2>&1
  echo "kernels rc=$?" >> "$OUT/kernels.log"; find benchmarks/results -name "kernels-*.json" -newer /tmp/t0 -exec cp {} "$OUT/" \; ) &
( mkdir -p "$OUT/pp2"; CUDA_VISIBLE_DEVICES=2,3 MOERAY_DIST_TIMEOUT_S=90 timeout -k 5 300 python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 1 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 10 --warmup 3 --overlap --out "$OUT/pp2" > "$OUT/train_pp2.log" 2>&1; echo "train pp2 rc=$?" >> "$OUT/train_pp2.log" ) &
wait; el "phase 1 done"
tail -6 "$OUT/pytest_fp8_shapes.log"; tail -8 "$OUT/pytest_gpu.log"; tail -30 "$OUT/kernels.log"
grep "bench train\]" "$OUT/train_pp2.log" | grep -v "step [0-9]*/" | tail -12; tail -4 "$OUT/train_pp2.log"
LEFT=$(( 560 - ($(date +%s) - T0) ))
el "phase 2 with ${LEFT}s"
MOERAY_DIST_TIMEOUT_S=90 timeout -k 5 $LEFT python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 2 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 14 --warmup 3 --overlap --out "$OUT" > "$OUT/train.log" 2>&1
el "train rc=$?"; grep "bench train\]" "$OUT/train.log" | grep -v "step [0-9]*/" | tail -14; tail -22 "$OUT/train.log"
