# Every opt-in decode fast path timed against the shipped engine in the same run (1 GPU, ~5 minutes
# a weights): `moeray bench engine --ab` at the Moonlight shape, batch 1 and 64, each switch of AB
# flipped alone on the same weights and prompts, then as shipped once more for the run's noise
# (engine.ab in engine-<gpu>-moonlight-<w>-ab.json; the log ends with the A/B table). WEIGHTS=bf16
# or fp8 one per call (both together pass 600 s); SHAPES=v3 for the V3 widths. Make a switch the
# default where it wins at both batches by more than the as_run_again spread, after its GPU tests
# (recipe opt-in-tests) pass.
export SHAPES="${SHAPES:-moonlight}" BATCHES=${BATCHES:-1,64} PROFILE_STEPS=${PROFILE_STEPS:-2}
export AB=${AB:-ARGMAX,HEAD_GEMV,FP8_GEMV_BATCH,SHARED_EARLY,FP8_AS_BF16}
export TAG_SUFFIX=${TAG_SUFFIX:--ab} SHAPES_LIMIT=${SHAPES_LIMIT:-420}
( source scripts/device/engine-shapes.sh ) || rc=1
for f in "$OUT"/engine-*"$TAG_SUFFIX".log; do
  [ -f "$f" ] && { echo "== $f"; grep -A40 "^ab  " "$f" | grep -v "^wrote\|^decode_tokens\|^hf_gen\|^roofline\|^prefill" | cut -c1-120; }
done
exit ${rc:-0}
