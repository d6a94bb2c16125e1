# Which moeray source lines launch a decode step's kernels: the engine decodes eagerly (no CUDA
# graphs) at Moonlight-16B-A3B widths cut to 3 layers (1 dense + 2 MoE), and each kernel is
# attributed to the innermost moeray frame that launched it (scripts/engine_step_profile.py
# --eager). Batch 1 and 32 (BATCHES); WEIGHTS=fp8 for e4m3 projections and experts (the FP8
# batch-64 step's copies and quantizations: notes-engine.md). 1 GPU, ~2 minutes; Ray is not
# needed.
for b in ${BATCHES:-1 32}; do
  mkdir -p "$OUT/sources-b$b"
  timeout -k 5 150 python3 scripts/engine_step_profile.py --preset moonlight_16b_a3b --layers 3 \
    --batch "$b" --steps 8 --profile-steps 4 --eager --weights "${WEIGHTS:-bf16}" \
    --out "$OUT/sources-b$b" > "$OUT/decode_sources_b$b.log" 2>&1 || rc=1
  el "decode sources batch $b"; grep -A12 "launching source line" "$OUT/decode_sources_b$b.log" | cut -c1-160
  grep "total kernels per step" "$OUT/decode_sources_b$b.log"
done
exit ${rc:-0}
