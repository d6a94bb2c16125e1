#!/usr/bin/env bash
# Session 5, call B (same H100, <= 590 s): one full `moeray bench kernels` run (every section:
# quant, fp8_gemm, grouped, fused MoE, MLA decode eager and under graphs, MLA prefill, router),
# whose JSON carries issue 4's `results` records and their targets.
set -u
source "$(dirname "$0")/device_env.sh"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 580 python3 -m moeray.cli bench kernels > "$OUT/bench.log" 2>&1
el "bench kernels rc=$?"
grep "^\[" "$OUT/bench.log"
sed -n '/^issue 4 targets/,$p' "$OUT/bench.log"
grep "^fp8_gemm M=\|^act_quant\|^weight\|^fused_moe\|^fp8_gemm_grouped" "$OUT/bench.log" | cut -c1-170
cp "$(ls -t benchmarks/results/kernels-*.json | head -1)" "$OUT/"
