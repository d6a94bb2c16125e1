#!/usr/bin/env bash
# Device call (4 GPUs, or 2 with EP=1; ~5-7 min, no carry): issue #5's PP=2 x EP=2 run after the allocator
# reservation (distributed.reserve_device_memory) and the padded + prewarmed BF16 GEMMs (weight_grad.matmul_*);
# the GPU tests of both on GPU 0 alongside.
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
( CUDA_VISIBLE_DEVICES=0 timeout -k 5 60 python3 -m pytest -q -s -p no:cacheprovider \
    tests/gpu/test_reserve_memory_gpu.py tests/gpu/test_fp8_prewarm_gpu.py > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.log" ) &
MOERAY_STACKS_DIR=$OUT MOERAY_DIST_TIMEOUT_S=60 timeout -k 5 ${TRAIN_LIMIT:-420} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep ${EP:-2} --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps ${STEPS:-8} --warmup 2 --overlap --out "$OUT" > "$OUT/train.log" 2>&1
el "train rc=$?"; wait
grep -v "^\s*$" "$OUT/pytest.log" | grep "B's\|passed\|failed\|Error" | tail -4
grep "bench train\]" "$OUT/train.log" | grep -v "step [0-9]*/" | tail -3
grep -v "^\s*$" "$OUT/train.log" | grep -v "UserWarning\|return Variable" | tail -18
for f in "$OUT"/stacks-*.txt; do [ -s "$f" ] && { echo "== $f"; grep -B1 -A3 "moeray/" "$f" | grep "File\|Thread" | head -24; }; done
