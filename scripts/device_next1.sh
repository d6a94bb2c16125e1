#!/usr/bin/env bash
# Next session, device call A (2 GPUs, ~9 min): everything CPU-tested on 2026-11-27 but not yet run
# on a GPU. Carry .gpu-bundle (kv/serve are in call B). Read benchmarks/notes-*.md for what to expect.
#   GPU 0: the FP8 scale-layout check (the NaN's suspected cause), the fused router (routing.route
#          uses it for CUDA inference: if it fails, MOERAY_FUSED_ROUTER=0), the ported FP8 GEMM, tests/gpu
#   GPU 1: `moeray bench kernels` (issue #4 numbers with the ported GEMM)
#   GPUs 0,1: `moeray bench train` PP=2 (issue #5), each schedule in fresh processes
set -u
source "$(dirname "$0")/device_env.sh"
touch /tmp/t0  # results written after this are this run's
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
( CUDA_VISIBLE_DEVICES=0 timeout -k 5 200 python3 -m pytest -q -s -p no:cacheprovider -m gpu \
    tests/kernels/test_fp8_training_shapes.py tests/kernels/test_router_kernel.py > "$OUT/pytest_fp8_shapes.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 200 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu \
    > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_gpu.log" ) &
( CUDA_VISIBLE_DEVICES=1 timeout -k 5 380 python3 -m moeray.cli bench kernels > "$OUT/kernels.log" 2>&1
  echo "kernels rc=$?" >> "$OUT/kernels.log"; find benchmarks/results -name "kernels-*.json" -newer /tmp/t0 -exec cp {} "$OUT/" \; ) &
wait; el "phase 1 done"
tail -8 "$OUT/pytest_fp8_shapes.log"; tail -8 "$OUT/pytest_gpu.log"; tail -30 "$OUT/kernels.log"
MOERAY_DIST_TIMEOUT_S=120 timeout -k 5 ${TRAIN_LIMIT:-300} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 1 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps 20 --warmup 3 --overlap --out "$OUT" > "$OUT/train.log" 2>&1
el "train rc=$?"; grep "bench train\]" "$OUT/train.log" | grep -v "step [0-9]*/" ; tail -22 "$OUT/train.log"
