#!/usr/bin/env bash
# Device call 1 (4 GPUs): training evidence for issue #5 and the 2-GPU serve comparison for #7.
#   GPUs 2,3: `moeray bench serve --launch` (colocated x2 vs P/D 1+1 per KV transport), in the background
#   GPUs 0,1: a short PP=2 DualPipe run without the overlap thread (hang check), then
#   GPUs 0-3: `moeray bench train --model small --pp 2 --ep 2` (the issue's run).
# Logs and result JSONs go to $OUT.
set -u
source "$(dirname "$0")/device_env.sh"
if [ -f .gpu-bundle/site.tar.xz ]; then
  use_bundle
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
python3 -c 'import ray; print("ray", ray.__version__)' || echo "no ray"

el "serve bench (GPUs 2,3) in background"
( CUDA_VISIBLE_DEVICES=2,3 timeout -k 10 ${SERVE_LIMIT:-300} python3 -m moeray.cli bench serve --launch \
    --gpus-per-replica 1 --cpus-per-replica 2 --num-requests 64 --concurrency 8 \
    --input-len 128 --output-len 128 --results-dir "$OUT" > "$OUT/serve.log" 2>&1; echo "serve rc=$?" >> "$OUT/serve.log" ) &
SERVE_PID=$!

el "train quick: PP=2 EP=1 no-overlap (GPUs 0,1)"
CUDA_VISIBLE_DEVICES=0,1 MOERAY_DIST_TIMEOUT_S=90 timeout -k 10 ${QUICK_LIMIT:-150} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 1 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 6 --warmup 2 --no-overlap --out "$OUT/quick" > "$OUT/train_quick.log" 2>&1
QRC=$?
el "train quick rc=$QRC"; grep -v "^\s*$" "$OUT/train_quick.log" | tail -15

wait $SERVE_PID
el "serve done"; tail -12 "$OUT/serve.log"

OVL=--overlap
[ $QRC -ne 0 ] && OVL=--no-overlap
el "train full: PP=2 x EP=2 $OVL (GPUs 0-3)"
MOERAY_DIST_TIMEOUT_S=120 timeout -k 10 ${FULL_LIMIT:-270} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 2 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 30 --warmup 3 $OVL --out "$OUT" > "$OUT/train_full.log" 2>&1
el "train full rc=$?"; grep -v "^\s*$" "$OUT/train_full.log" | tail -25
