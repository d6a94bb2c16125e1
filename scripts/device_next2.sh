#!/usr/bin/env bash
# Next session, device call B (2 GPUs, ~9 min; carry .gpu-bundle): issue #7's channel after the
# early receive, the Serve comparison alone on the machine, then issue #6's engine bench (MTP at
# batch 16 with uniform S, graphs captured at engine start, fused-router A/B) on one GPU. For H100 engine numbers comparable to the issue's, run the
# engine line on nvidia-h100-x1 instead.
set -u
source "$(dirname "$0")/device_env.sh"
use_bundle
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tiny_engine_gpu.py \
  > "$OUT/pytest_engine.log" 2>&1; el "engine GPU tests rc=$?"; tail -3 "$OUT/pytest_engine.log"
timeout -k 5 150 python3 -m moeray.cli bench kv --device cuda --tokens 64,512,4096 --iters 20 \
  --budget-s 6 --timeout-s 40 --out-dir "$OUT" > "$OUT/kv.log" 2>&1; el "kv rc=$?"
grep -v "^\s*$" "$OUT/kv.log" | tail -16
timeout -k 5 200 python3 -m moeray.cli bench serve --launch --gpus-per-replica 1 --cpus-per-replica 2 \
  --num-requests 48 --concurrency 8 --input-len 128 --output-len 128 --results-dir "$OUT" \
  > "$OUT/serve.log" 2>&1; el "serve rc=$?"; grep -v "raylet\|INFO" "$OUT/serve.log" | tail -10
CUDA_VISIBLE_DEVICES=0 timeout -k 5 200 python3 -m moeray.cli bench engine --device cuda --hf-max-batch 64 \
  --out-dir "$OUT" > "$OUT/engine.log" 2>&1; el "engine rc=$?"; grep -v "UNEXPECTED" "$OUT/engine.log" | tail -6
