# The decode glue kernels' bench (router logits to 256 tokens, V3's too), then FP8 linear
# layers at batch 64 (past fp8_gemv's 16 rows; 1 GPU, ~7 minutes): the candidate sweep
# of scripts/fp8_small_m_sweep.py (act_quant + block-scaled GEMM as shipped, bf16 F.linear,
# fp8_gemv's dot tiles on bf16 or e4m3 x over tiles and split-K counts) at Moonlight's and V3's
# projections, then the V3 widths at batch 64 as shipped (-shipped) and with the router's
# kernels at batch 64 (MOERAY_FUSED_ROUTE_BATCH=1, -routebatch), bf16 and FP8. ROWS=32,64 sweeps
# more batch sizes; ENGINE=0 leaves the engine runs out.
CUDA_VISIBLE_DEVICES=0 timeout -k 5 90 python3 -m moeray.cli bench kernels --only decode_glue \
  --tag decode-glue-routing > "$OUT/decode_glue.log" 2>&1 || rc=1
el "bench kernels decode_glue rc=${rc:-0}"; grep "router_logits\|^decode" "$OUT/decode_glue.log" | tail -12 | cut -c1-160
cp benchmarks/results/kernels-*-decode-glue-routing.json "$OUT/" 2>/dev/null
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SWEEP_LIMIT:-270} python3 scripts/fp8_small_m_sweep.py \
  --rows ${ROWS:-64} --budget-s ${SWEEP_BUDGET:-220} --out "$OUT/fp8-small-m-sweep.json" \
  > "$OUT/fp8_small_m_sweep.log" 2>&1 || rc=1
el "fp8 small-M sweep rc=${rc:-0}"; grep -v "^    best" "$OUT/fp8_small_m_sweep.log" | tail -12 | cut -c1-200
if [ "${ENGINE:-1}" = 1 ]; then
  export SHAPES="${SHAPES:-v3}" PROFILE_STEPS=${PROFILE_STEPS:-2} BATCHES=${BATCHES:-64}
  ( export TAG_SUFFIX=-shipped; source scripts/device/engine-shapes.sh ) || rc=1
  ( export MOERAY_FUSED_ROUTE_BATCH=1 TAG_SUFFIX=-routebatch
    source scripts/device/engine-shapes.sh ) || rc=1
fi
exit ${rc:-0}
