#!/usr/bin/env bash
# Next session, call B (2 GPUs, ~9 min, carry .gpu-bundle): issue #6 after the inference-mode
# capture fix and the router gate (GPU tests, router bench at 32/256 tokens, engine bench), then
# issue #7's channel and Serve comparison (scripts/device_next2.sh's kv and serve lines).
set -u
source "$(dirname "$0")/device_env.sh"
use_bundle
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
# tests/gpu and tests/kernels in separate processes (tests/gpu/conftest.py says why)
gpu_pytest pytest.log 150 tests/gpu/test_tiny_engine_gpu.py
gpu_pytest pytest_router.log 150 tests/kernels/test_gate.py
CUDA_VISIBLE_DEVICES=0 timeout -k 5 90 python3 -m moeray.cli bench kernels --only router --tag router \
  > "$OUT/router.log" 2>&1; el "router bench rc=$?"; grep -i "tokens\|router" "$OUT/router.log" | tail -14
cp benchmarks/results/kernels-*-router.json "$OUT/" 2>/dev/null
CUDA_VISIBLE_DEVICES=0 timeout -k 5 300 python3 -m moeray.cli bench engine --device cuda --hf-max-batch 64 \
  --out-dir "$OUT" > "$OUT/engine.log" 2>&1; el "engine rc=$?"; grep -v "UNEXPECTED" "$OUT/engine.log" | tail -6
timeout -k 5 150 python3 -m moeray.cli bench kv --device cuda --tokens 64,512,4096 --iters 20 \
  --budget-s 6 --timeout-s 40 --out-dir "$OUT" > "$OUT/kv.log" 2>&1; el "kv rc=$?"
grep -v "^\s*$" "$OUT/kv.log" | tail -8
