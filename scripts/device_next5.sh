#!/usr/bin/env bash
# Device call (4 GPUs, ~9 min; carry .gpu-bundle) after FP8 token padding + prewarm and forced
# CUDA_MODULE_LOADING=EAGER (platform/fp8.py, parallel/distributed.py):
#   phase 1: `moeray bench train` PP=2 x EP=2 on all four GPUs (issue #5's evidence run); the
#            FP8-prewarm and hostcopy GPU tests on GPU 0 alongside (seconds; warm-up steps only)
#   phase 2: if phase 1 failed, the same with --no-overlap; else `moeray bench kv` (issue #7)
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
echo "image CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING-<unset>}"
( CUDA_VISIBLE_DEVICES=0 timeout -k 5 120 python3 -m pytest -q -s -p no:cacheprovider \
    tests/gpu/test_fp8_prewarm_gpu.py tests/gpu/test_hostcopy_gpu.py > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest.log" ) &
train() {  # $1: limit, rest: extra args
  local lim=$1; shift
  MOERAY_DIST_TIMEOUT_S=90 timeout -k 5 $lim python3 -m moeray.cli bench train \
    --model small --device cuda --pp 2 --ep 2 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
    --steps 12 --warmup 3 --out "$OUT" "$@"
}
train 330 --overlap > "$OUT/train.log" 2>&1; rc=$?
el "train overlap rc=$rc"; wait
grep -v "^\s*$" "$OUT/pytest.log" | grep -v "Warning\|warn" | tail -6
grep "bench train\]" "$OUT/train.log" | grep -v "step [0-9]*/" | tail -4
grep -v "^\s*$" "$OUT/train.log" | grep -v "UserWarning\|return Variable" | tail -16
LEFT=$(( 540 - ($(date +%s) - T0) ))
if [ $rc -ne 0 ]; then
  el "phase 2: --no-overlap with ${LEFT}s"
  train $LEFT --no-overlap > "$OUT/train_seq.log" 2>&1; el "train no-overlap rc=$?"
  grep -v "^\s*$" "$OUT/train_seq.log" | grep -v "UserWarning\|return Variable" | tail -16
else
  el "phase 2: bench kv with ${LEFT}s"
  use_bundle
  timeout -k 5 $(( LEFT < 150 ? LEFT : 150 )) python3 -m moeray.cli bench kv --device cuda --tokens 64,512,4096 \
    --iters 20 --budget-s 6 --timeout-s 40 --out-dir "$OUT" > "$OUT/kv.log" 2>&1; el "kv rc=$?"
  grep -v "^\s*$" "$OUT/kv.log" | tail -14
fi
