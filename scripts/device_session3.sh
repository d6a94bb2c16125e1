#!/usr/bin/env bash
# Device call 3 (2 GPUs): KV transports at V3 sizes vs raw NCCL, then the Serve comparison
# (2 colocated replicas vs 1 prefill + 1 decode per transport), then (if present) the MTP GPU tests.
set -u
source "$(dirname "$0")/device_env.sh"
use_bundle
timeout -k 5 130 python3 -m moeray.cli bench kv --device cuda --tokens 64,512,4096 \
    --iters 20 --budget-s 6 --timeout-s 40 --out-dir "$OUT" > "$OUT/kv.log" 2>&1; el "kv rc=$?"
timeout -k 5 200 python3 -m moeray.cli bench serve --launch \
    --gpus-per-replica 1 --cpus-per-replica 2 --num-requests 48 --concurrency 8 \
    --input-len 128 --output-len 128 --results-dir "$OUT" > "$OUT/serve.log" 2>&1; el "serve rc=$?"
if [ -n "${EXTRA:-}" ]; then CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${EXTRA_LIMIT:-200} bash -c "$EXTRA" > "$OUT/extra.log" 2>&1; el "extra rc=$?"; fi
grep -v "^\s*$" "$OUT/kv.log" | tail -22; grep -v "raylet\|INFO" "$OUT/serve.log" | tail -14
[ -f "$OUT/extra.log" ] && tail -40 "$OUT/extra.log"
