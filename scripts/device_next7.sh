#!/usr/bin/env bash
# Device call (4 GPUs, ~8 min, no carry): issue #5's whole train bench (PP=2 x EP=2: dualpipe-fp8,
# 1f1b-fp8, dualpipe-bf16) writing train-<gpu>.json, then issue #4's `moeray bench kernels` alone
# on GPU 0. Stack dumps go to /tmp and only non-empty ones come back ($OUT returns few files).
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
mkdir -p /tmp/stacks /tmp/results
MOERAY_STACKS_DIR=/tmp/stacks MOERAY_DIST_TIMEOUT_S=60 timeout -k 5 ${TRAIN_LIMIT:-330} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep ${EP:-2} --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps ${STEPS:-8} --warmup 2 --overlap --out /tmp/results > "$OUT/train.log" 2>&1
el "train rc=$?"
for f in /tmp/stacks/*.txt; do [ -s "$f" ] && cp "$f" "$OUT/"; done
cp /tmp/results/*.json "$OUT/" 2>/dev/null
grep "bench train\]" "$OUT/train.log" | grep "done\|failed" | cut -c1-300
grep -v "^\s*$" "$OUT/train.log" | grep -v "UserWarning\|return Variable\|step [0-9]*/" | tail -14
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${KERNELS_LIMIT:-200} python3 -m moeray.cli bench kernels \
  > "$OUT/kernels.log" 2>&1; el "kernels rc=$?"
cp benchmarks/results/kernels-*.json "$OUT/" 2>/dev/null
grep -i "fp8_gemm\|ratio\|written" "$OUT/kernels.log" | tail -24
