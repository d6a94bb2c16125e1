#!/usr/bin/env bash
# Next session, call A (4 GPUs, ~9 min, no carry): issue #5's train bench again with a stable
# learning rate and 20 steps (a second clean run of the final code, and an FP8/BF16 loss comparison
# that is not noise; each run's last step profiled on rank 0 with PROFILE=1). The FP8 runs use the
# grouped FP8 GEMM (the CUDA default since the fifth session, which ran this with GROUPED=1 when it
# was opt-in); PER_EXPERT=1 runs the old per-expert FP8 GEMMs.
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
mkdir -p /tmp/stacks /tmp/results
[ -n "${SKIP_TESTS:-}" ] || gpu_pytest pytest.log 150 tests/gpu/test_fp8_prewarm_gpu.py tests/gpu/test_reserve_memory_gpu.py
MOERAY_STACKS_DIR=/tmp/stacks MOERAY_DIST_TIMEOUT_S=$([ -n "${PROFILE:-}" ] && echo 300 || echo 60) timeout -k 5 ${TRAIN_LIMIT:-480} python3 -m moeray.cli bench train \
  --model small --device cuda --pp 2 --ep 2 --seq-len 1024 --micro-batch-size 2 --microbatches 8 \
  --steps ${STEPS:-20} --warmup 3 --lr ${LR:-1e-3} --overlap --out /tmp/results ${PROFILE:+--profile /tmp/prof} ${PER_EXPERT:+--no-grouped-fp8} > "$OUT/train.log" 2>&1
el "train rc=$?"
find /tmp/stacks -empty -delete; mkdir -p /tmp/prof; tar czf "$OUT/stacks-profiles.tgz" -C /tmp stacks prof
cp /tmp/results/train-*.json "$OUT/" 2>/dev/null
grep "bench train\]" "$OUT/train.log" | grep "done\|failed" | cut -c1-300
grep -v "^\s*$" "$OUT/train.log" | grep -v "UserWarning\|return Variable\|step [0-9]*/" | tail -14
