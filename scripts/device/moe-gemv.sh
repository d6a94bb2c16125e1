# moe_gemv (the fused MoE at <= 16 assignments without alignment, kernels/moe_gemv.py): its GPU
# tests (Moonlight and V3 expert shapes, bf16 and FP8, CUDA graph, agreement with the aligned path,
# the PDL chains of both paths), then scripts/moe_decode_sweep.py --path both at 1 and 2 tokens
# (whole MoE in a CUDA graph, weights out of L2: us and TB/s, each path's tiles), then the
# Moonlight engine A/B (the aligned path as it runs by default, then MOERAY_FUSED_MOE_GEMV=1:
# engine-<gpu>-moonlight-<w>{,-moegemv}.json) unless ENGINE_AB=0. 1 GPU, ~10 minutes; SHAPES (moonlight,v3) for the sweep.
gpu_pytest pytest_moe_gemv.log ${MOE_GEMV_TEST_LIMIT:-300} tests/gpu/test_moe_gemv_gpu.py \
  tests/gpu/test_pdl_gpu.py -k "moe_gemv or moe_layer_chain" || rc=1
SLUG=$(python3 -c 'from moeray.results import device_slug as d; print(d())')
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SWEEP_LIMIT:-400} python3 scripts/moe_decode_sweep.py \
  --path both --shapes ${SHAPES:-moonlight,v3} --tokens 1,2 --block-m 16 --block-n 32,64 \
  --stages 4 --out "$OUT/moe-gemv-sweep-$SLUG.json" > "$OUT/moe_gemv_sweep.log" 2>&1 || rc=1
el "moe_decode_sweep --path both rc=${rc:-0}"
sed -n '/^best/,$p' "$OUT/moe_gemv_sweep.log"; grep -i "error" "$OUT/moe_gemv_sweep.log" | head -3
if [ "${ENGINE_AB:-1}" != 0 ]; then
  ( SHAPES=moonlight PROFILE_STEPS=2 source scripts/device/engine-shapes.sh ) || rc=1
  ( MOERAY_FUSED_MOE_GEMV=1 TAG_SUFFIX=-moegemv SHAPES=moonlight PROFILE_STEPS=2 \
    source scripts/device/engine-shapes.sh ) || rc=1
fi
exit ${rc:-0}
