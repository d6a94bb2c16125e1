#!/usr/bin/env bash
# Device call 2 (4 GPUs), after the fixes from call 1. Phase 1 runs side by side:
#   GPUs 0,1: PP=2 DualPipe hang check (overlap on), then GPU 0: tests/gpu, GPU 1: fp8 GEMM sweep
#   GPUs 2,3: `moeray bench kv` (KV transports at V3 sizes vs raw NCCL), then `moeray bench serve --launch`
# Phase 2, GPUs 0-3: `moeray bench train --model small --pp 2 --ep 2` (issue #5 point 8).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NCCL_DEBUG=WARN
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
mkdir -p /tmp/site && tar xJf .gpu-bundle/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name --format=csv,noheader | head -1

( CUDA_VISIBLE_DEVICES=2,3 timeout -k 5 120 python3 -m moeray.cli bench kv --device cuda --tokens 64,512,4096 \
    --iters 20 --budget-s 6 --timeout-s 40 --out-dir "$OUT" > "$OUT/kv.log" 2>&1; echo "kv rc=$?" >> "$OUT/kv.log"
  CUDA_VISIBLE_DEVICES=2,3 timeout -k 5 170 python3 -m moeray.cli bench serve --launch \
    --gpus-per-replica 1 --cpus-per-replica 2 --num-requests 48 --concurrency 8 \
    --input-len 128 --output-len 128 --results-dir "$OUT" > "$OUT/serve.log" 2>&1; echo "serve rc=$?" >> "$OUT/serve.log" ) &
P23=$!

CUDA_VISIBLE_DEVICES=0,1 MOERAY_DIST_TIMEOUT_S=60 timeout -k 5 120 python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 1 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 4 --warmup 1 --overlap --out "$OUT/quick" > "$OUT/train_quick.log" 2>&1
QRC=$?
el "train quick rc=$QRC"; grep "bench train\|Error\|Timeout" "$OUT/train_quick.log" | tail -12

( CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors tests/gpu -rs > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_gpu.log" ) &
P0=$!
( CUDA_VISIBLE_DEVICES=1 timeout -k 5 150 python3 scripts/fp8_gemm_sweep.py --budget 110 > "$OUT/fp8_sweep.log" 2>&1; echo "sweep rc=$?" >> "$OUT/fp8_sweep.log" ) &
P1=$!
wait $P0 $P1 $P23
el "phase 1 done"
tail -12 "$OUT/pytest_gpu.log"; tail -30 "$OUT/fp8_sweep.log"; tail -22 "$OUT/kv.log"; tail -10 "$OUT/serve.log"

OVL=--overlap
[ $QRC -ne 0 ] && OVL=--no-overlap
el "train full: PP=2 x EP=2 $OVL"
MOERAY_DIST_TIMEOUT_S=100 timeout -k 5 ${FULL_LIMIT:-260} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 2 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 20 --warmup 3 $OVL --out "$OUT" > "$OUT/train_full.log" 2>&1
el "train full rc=$?"; grep -v "^\s*$" "$OUT/train_full.log" | grep -v "^\[bench train\] .*step [0-9]*/" | tail -25
