#!/usr/bin/env bash
# Device call (4 GPUs, ~9.5 min, no carry) after the pinned host reads (platform/hostcopy.py):
#   phase 1, in parallel:
#     GPU 3    the hostcopy GPU test (does a pageable .tolist() block other threads?), then
#              `moeray bench engine` (issue #6: MTP at batch 16 after the uniform-S change)
#     GPU 0,1  `moeray bench train` PP=2 x EP=1 with the threaded overlap (the bf16 run hung before)
#   phase 2: `moeray bench train` PP=2 x EP=2 on all four GPUs (issue #5's evidence run)
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
( CUDA_VISIBLE_DEVICES=3 timeout -k 5 60 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_hostcopy_gpu.py \
    > "$OUT/pytest_hostcopy.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_hostcopy.log"
  CUDA_VISIBLE_DEVICES=3 timeout -k 5 220 python3 -m moeray.cli bench engine --device cuda --hf-max-batch 64 \
    --out-dir "$OUT" > "$OUT/engine.log" 2>&1; echo "engine rc=$?" >> "$OUT/engine.log" ) &
( mkdir -p "$OUT/pp2"; CUDA_VISIBLE_DEVICES=0,1 MOERAY_DIST_TIMEOUT_S=90 timeout -k 5 260 python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 1 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 12 --warmup 3 --overlap --out "$OUT/pp2" > "$OUT/train_pp2.log" 2>&1; echo "train pp2 rc=$?" >> "$OUT/train_pp2.log" ) &
wait; el "phase 1 done"
grep -v "^\s*$" "$OUT/pytest_hostcopy.log" | tail -5; grep -v "UNEXPECTED" "$OUT/engine.log" | tail -8
grep "bench train\]" "$OUT/train_pp2.log" | grep -v "step [0-9]*/" | tail -6; grep -v "^\s*$" "$OUT/train_pp2.log" | tail -16
LEFT=$(( 555 - ($(date +%s) - T0) ))
el "phase 2 with ${LEFT}s"
MOERAY_DIST_TIMEOUT_S=90 timeout -k 5 $LEFT python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 2 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 12 --warmup 3 --overlap --out "$OUT" > "$OUT/train.log" 2>&1
el "train rc=$?"; grep "bench train\]" "$OUT/train.log" | grep -v "step [0-9]*/" | tail -8; grep -v "^\s*$" "$OUT/train.log" | grep -v "UserWarning\|return Variable" | tail -20
