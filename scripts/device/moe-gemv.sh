# moe_gemv (the fused MoE at <= 16 assignments without alignment, kernels/moe_gemv.py): its GPU
# tests (Moonlight and V3 expert shapes, bf16 and FP8, CUDA graph, agreement with the aligned path,
# the PDL chains of both paths), then scripts/moe_decode_sweep.py --path both at 1 and 2 tokens
# (whole MoE in a CUDA graph, weights out of L2: us and TB/s, each path's tiles). 1 GPU, ~6
# minutes; SHAPES (moonlight,v3) for the sweep. The engine A/B, in a call of its own (~6 minutes:
# batch 1 and 2 are the only ones moe_gemv changes, <= 16 assignments):
#   BATCHES=1,2 TAG_SUFFIX=-b12 SHAPES=moonlight scripts/device/run.sh engine-shapes
#   MOERAY_FUSED_MOE_GEMV=1 BATCHES=1,2 TAG_SUFFIX=-b12-moegemv SHAPES=moonlight \
#     scripts/device/run.sh engine-shapes
gpu_pytest pytest_moe_gemv.log ${MOE_GEMV_TEST_LIMIT:-200} tests/gpu/test_moe_gemv_gpu.py \
  tests/gpu/test_pdl_gpu.py -k "moe_gemv or moe_layer_chain" || rc=1
SLUG=$(python3 -c 'from moeray.results import device_slug as d; print(d())')
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SWEEP_LIMIT:-240} python3 scripts/moe_decode_sweep.py \
  --path both --shapes ${SHAPES:-moonlight,v3} --tokens 1,2 --block-m 16 --block-n 32,64 \
  --stages 4 --out "$OUT/moe-gemv-sweep-$SLUG.json" > "$OUT/moe_gemv_sweep.log" 2>&1 || rc=1
el "moe_decode_sweep --path both rc=${rc:-0}"
sed -n '/^best/,$p' "$OUT/moe_gemv_sweep.log"; grep -i "error" "$OUT/moe_gemv_sweep.log" | head -3
exit ${rc:-0}
