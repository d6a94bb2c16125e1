#!/usr/bin/env bash
# Session 5, call D (1 GPU, ~3 min, no carry): where a batch-1 and a batch-16 decode step's time
# goes (issue 6's roofline gap: 3.5 ms per step at batch 1 against an 87 us floor, notes-engine.md).
set -u
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
for b in 1 16; do
  mkdir -p "$OUT/b$b"
  timeout -k 5 200 python3 scripts/engine_step_profile.py --preset small --batch $b --out "$OUT/b$b" > "$OUT/engine_step_b$b.log" 2>&1
  el "engine step profile batch $b rc=$?"; tail -25 "$OUT/engine_step_b$b.log" | cut -c1-200
done
