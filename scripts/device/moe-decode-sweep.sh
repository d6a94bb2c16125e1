# The fused MoE's block configs at decode token counts (scripts/moe_decode_sweep.py: a whole
# fused_moe in a CUDA graph of 20 calls over other experts each, weights out of L2), bf16 and FP8,
# Moonlight and V3 expert shapes -> $OUT/moe-decode-sweep-<gpu>.json and a best-per-shape table.
# 1 GPU, ~2 minutes a shape at the defaults; SHAPES (moonlight,v3), TOKENS (1,8,64), BLOCK_M (16,32),
# BLOCK_N (32,64,128), STAGES (3,4); ALIGNED_DOWN="64:4:4,128:8:3" adds the down launch's own tiles
# (BLOCK_N:warps:stages, each with every gate/up tile), TAG a suffix for the result file's name.
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SWEEP_LIMIT:-300} python3 scripts/moe_decode_sweep.py \
  --shapes ${SHAPES:-moonlight,v3} --tokens ${TOKENS:-1,8,64} \
  --block-m ${BLOCK_M:-16,32} --block-n ${BLOCK_N:-32,64,128} --stages ${STAGES:-3,4} \
  ${ALIGNED_DOWN:+--aligned-down $ALIGNED_DOWN} \
  --out "$OUT/moe-decode-sweep-$(python3 -c 'from moeray.results import device_slug as d; print(d())')${TAG:-}.json" \
  > "$OUT/moe_decode_sweep.log" 2>&1
rc=$?; el "moe_decode_sweep rc=$rc"
sed -n '/^best/,$p' "$OUT/moe_decode_sweep.log"; grep -i "error" "$OUT/moe_decode_sweep.log" | head -3
exit $rc
