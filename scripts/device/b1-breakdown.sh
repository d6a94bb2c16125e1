# Where a batch-1 decode step goes, in one call (1 GPU, ~6 minutes): the MLA decode sweep at short
# contexts (scripts/mla_decode_sweep.py: head block, warps, stages, splits at 160 and 1,024 cached
# tokens), `moeray bench engine` at batch 1 with programmatic dependent launch off (PDL makes a
# kernel's profiled time include its wait on the one before; off, each kernel's time is its own:
# MOERAY_FUSED_PDL=0 TAG_SUFFIX=-b1-nopdl) at Moonlight and V3 widths in bf16 and FP8, each with
# decode_graph_ms (the forward alone) against the step, then scripts/engine_step_profile.py on a
# 4-layer Moonlight cut at batch 1: the host work around the model call, by op.
slug=$(python3 -c 'from moeray.results import device_slug as d; print(d())')
PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${MLA_SWEEP_LIMIT:-150} python3 scripts/mla_decode_sweep.py \
  --out "$OUT/mla-decode-sweep-$slug.json" > "$OUT/mla_decode_sweep.log" 2>&1 || rc=1
el "mla_decode_sweep"; grep -A3 "^heads" "$OUT/mla_decode_sweep.log" | head -24
( export MOERAY_FUSED_PDL=0 BATCHES=1 TAG_SUFFIX=-b1-nopdl SHAPES="${SHAPES:-moonlight v3}"
  source scripts/device/engine-shapes.sh ) || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${STEP_LIMIT:-120} python3 scripts/engine_step_profile.py \
  --preset moonlight_16b_a3b --layers 4 --batch 1 --out "$OUT" > "$OUT/engine_step_b1.log" 2>&1 || rc=1
el "engine step profile"; tail -6 "$OUT/engine_step_b1.log"
exit ${rc:-0}
