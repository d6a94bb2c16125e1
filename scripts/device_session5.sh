#!/usr/bin/env bash
# Device call 5 (2 GPUs), side by side (the device budget left no room to run them in turn):
#   GPUs 0,1: `moeray bench serve --launch` (2 colocated vs 1 prefill + 1 decode per KV transport)
#   GPU 0:    the MTP-graph and tiny-model GPU engine tests
#   GPU 1:    `moeray bench engine` MTP speedup at 4 layers
set -u
source "$(dirname "$0")/device_env.sh"
( CUDA_VISIBLE_DEVICES=0 timeout -k 5 230 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_engine_mtp_gpu.py tests/gpu/test_tiny_engine_gpu.py > "$OUT/pytest_mtp.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_mtp.log" ) &
( CUDA_VISIBLE_DEVICES=1 timeout -k 5 230 python3 -m moeray.cli bench engine --device cuda --layers 4 --batch-sizes 1,16 --hf-max-batch 0 --out-dir "$OUT" > "$OUT/engine.log" 2>&1; echo "engine rc=$?" >> "$OUT/engine.log" ) &
use_bundle
timeout -k 5 220 python3 -m moeray.cli bench serve --launch \
    --gpus-per-replica 1 --cpus-per-replica 2 --num-requests 48 --concurrency 8 \
    --input-len 128 --output-len 128 --results-dir "$OUT" > "$OUT/serve.log" 2>&1; el "serve rc=$?"
wait; el done
grep -v "raylet\|INFO" "$OUT/serve.log" | tail -12; tail -45 "$OUT/pytest_mtp.log"; tail -25 "$OUT/engine.log"
