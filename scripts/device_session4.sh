#!/usr/bin/env bash
# Device call 4 (2 GPUs): PP=2 DualPipe training bench after the rehearsal fix, then the KV-transport bench.
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
train() {  # $1 = --overlap | --no-overlap, $2 = limit s
  MOERAY_DIST_TIMEOUT_S=75 timeout -k 5 $2 python3 -m moeray.cli bench train \
    --model small --device cuda --pp 2 --ep 1 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
    --steps 20 --warmup 3 $1 --out "$OUT" > "$OUT/train$1.log" 2>&1
  local rc=$?; el "train $1 rc=$rc"; grep -v "^\s*$" "$OUT/train$1.log" | grep -v "step [0-9]*/[0-9]*" | tail -22; return $rc
}
train --overlap 230 || train --no-overlap 150
use_bundle
timeout -k 5 140 python3 -m moeray.cli bench kv --device cuda --tokens 64,512,4096 \
    --iters 20 --budget-s 6 --timeout-s 40 --out-dir "$OUT" > "$OUT/kv.log" 2>&1; el "kv rc=$?"
grep -v "^\s*$" "$OUT/kv.log" | tail -24
