#!/usr/bin/env bash
# Device call 2 (2 GPUs; 4-GPU machines were withheld), after the fixes from call 1.
#   GPUs 0,1: `moeray bench train --model small --pp 2` (DualPipe overlap on; off if that fails)
#   then GPU 0: tests/gpu  |  GPU 1: scripts/fp8_gemm_sweep.py
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
train() {  # $1 = --overlap | --no-overlap, $2 = limit s
  MOERAY_DIST_TIMEOUT_S=60 timeout -k 5 $2 python3 -m moeray.cli bench train \
    --model small --device cuda --pp 2 --ep 1 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
    --steps 20 --warmup 3 $1 --out "$OUT" > "$OUT/train$1.log" 2>&1
  local rc=$?; el "train $1 rc=$rc"; grep -v "^\s*$" "$OUT/train$1.log" | grep -v "step [0-9]*/[0-9]*" | tail -22; return $rc
}
train --overlap ${TRAIN_LIMIT:-210} || train --no-overlap 150
( CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/gpu -rs > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_gpu.log" ) &
( CUDA_VISIBLE_DEVICES=1 timeout -k 5 150 python3 scripts/fp8_gemm_sweep.py --budget 110 > "$OUT/fp8_sweep.log" 2>&1; echo "sweep rc=$?" >> "$OUT/fp8_sweep.log" ) &
wait
el "done"; tail -14 "$OUT/pytest_gpu.log"; tail -32 "$OUT/fp8_sweep.log"
