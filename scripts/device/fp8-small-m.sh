# FP8 linear layers at decode batches past 16 rows (1 GPU, ~7 minutes): the GPU test of the
# opt-in MOERAY_FUSED_FP8_GEMV_BATCH=1 (FP8Linear runs fp8_gemv to 64 rows, fewer K splits), the
# candidate sweep of scripts/fp8_small_m_sweep.py (act_quant + block-scaled GEMM as shipped, bf16
# F.linear, fp8_gemv's dot tiles on bf16 or e4m3 x over BLOCK_N x split-K) at Moonlight's and
# V3's projections, then Moonlight FP8 at batch 64 as shipped (-shipped) and with the switch
# (-gemvbatch). ROWS=32,64 sweeps more batch sizes; SHAPES="moonlight v3" adds the V3 widths;
# ENGINE=0 leaves the engine runs out. Set `_gemv_config`'s batch rule from the sweep, then make
# the switch the default where the engine gains.
gpu_pytest pytest_fp8_gemv_batch.log ${TEST_LIMIT:-120} tests/gpu/test_fp8_gemv_gpu.py -k "batch_switch" || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SWEEP_LIMIT:-240} python3 scripts/fp8_small_m_sweep.py \
  --rows ${ROWS:-64} --budget-s ${SWEEP_BUDGET:-180} --out "$OUT/fp8-small-m-sweep.json" \
  > "$OUT/fp8_small_m_sweep.log" 2>&1 || rc=1
el "fp8 small-M sweep rc=${rc:-0}"; grep -v "^    best" "$OUT/fp8_small_m_sweep.log" | tail -12 | cut -c1-200
if [ "${ENGINE:-1}" = 1 ]; then
  export SHAPES="${SHAPES:-moonlight}" WEIGHTS=fp8 PROFILE_STEPS=${PROFILE_STEPS:-2} BATCHES=${BATCHES:-64}
  ( export TAG_SUFFIX=-shipped; source scripts/device/engine-shapes.sh ) || rc=1
  ( export MOERAY_FUSED_FP8_GEMV_BATCH=1 TAG_SUFFIX=-gemvbatch
    source scripts/device/engine-shapes.sh ) || rc=1
fi
exit ${rc:-0}
