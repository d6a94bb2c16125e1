#!/usr/bin/env bash
# Device call (4 GPUs, ~9 min, carry .gpu-bundle): issue #5's whole train bench (PP=2 x EP=2) with
# the per-op host wait for receives, then issue #6's engine bench alone on GPU 0. All stack dumps
# come back in one tarball ($OUT returns few files).
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
mkdir -p /tmp/stacks /tmp/results
MOERAY_STACKS_DIR=/tmp/stacks MOERAY_DIST_TIMEOUT_S=60 timeout -k 5 ${TRAIN_LIMIT:-330} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep ${EP:-2} --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps ${STEPS:-8} --warmup 2 --overlap --out /tmp/results > "$OUT/train.log" 2>&1
el "train rc=$?"
find /tmp/stacks -empty -delete; tar czf "$OUT/stacks.tgz" -C /tmp stacks
cp /tmp/results/*.json "$OUT/" 2>/dev/null
grep "bench train\]" "$OUT/train.log" | grep "done\|failed" | cut -c1-300
grep -v "^\s*$" "$OUT/train.log" | grep -v "UserWarning\|return Variable\|step [0-9]*/" | tail -14
use_bundle
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${ENGINE_LIMIT:-200} python3 -m moeray.cli bench engine --device cuda --hf-max-batch 64 \
  --out-dir /tmp/results > "$OUT/engine.log" 2>&1; el "engine rc=$?"; grep -v "UNEXPECTED" "$OUT/engine.log" | tail -8
cp /tmp/results/engine-*.json "$OUT/" 2>/dev/null
