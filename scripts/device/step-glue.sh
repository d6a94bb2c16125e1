# The nineteenth session's decode-step opt-ins, timed in one call (1 GPU, ~7 minutes on an H100):
# their GPU tests (the step's positions and slots in one launch inside the decode graphs; MLA half
# pages for the sequences with fewer pages than splits, mixed with long ones; the shared experts
# fused before the projection merge, GLUE_ENGINE_TESTS=0 skips those), the decode_glue row
# of paged_positions against its nine PyTorch ops, then `bench engine --ab` at Moonlight FP8
# batch 1 / 8 / 64 with PAGED_POSITIONS, MLA_SUBPAGE and NORM_W_EARLY each flipped alone, and
# MLA_SUBPAGE again after 2K-token prompts at batch 1 / 64 (its half pages must not cost there).
# Make a switch the default where it wins by more than as_run_again's spread and loses nowhere.
# Results: engine-<gpu>-moonlight-fp8-glue{,-2k}.json (engine.ab), kernels-<gpu>-glue.json.
gpu_pytest pytest_glue.log "${GPU_LIMIT:-120}" tests/gpu/test_tiny_engine_gpu.py \
  tests/gpu/test_kernels_gpu.py -k "paged_positions or real_shapes" || rc=1
if [ "${GLUE_ENGINE_TESTS:-1}" = 1 ]; then
  gpu_pytest pytest_fuse.log "${FUSE_LIMIT:-150}" tests/gpu/test_shared_fuse_gpu.py \
    tests/gpu/test_merge_projections_gpu.py || rc=1
fi
CUDA_VISIBLE_DEVICES=0 timeout -k 5 60 python3 -m moeray.cli bench kernels --only decode_glue \
  --tag glue > "$OUT/glue.log" 2>&1 || rc=1
el "bench kernels decode_glue rc=${rc:-0}"; grep "paged_positions\|failed" "$OUT/glue.log" | cut -c1-160
cp benchmarks/results/kernels-*-glue.json "$OUT/" 2>/dev/null
( export WEIGHTS=fp8 BATCHES=1,8,64 AB=PAGED_POSITIONS,MLA_SUBPAGE,NORM_W_EARLY TAG_SUFFIX=-glue \
    SHAPES_LIMIT=${SHAPES_LIMIT:-150}; source scripts/device/decode-ab.sh ) || rc=1
( export WEIGHTS=fp8 BATCHES=1,64 AB=MLA_SUBPAGE PROMPT_LEN=2048 TAG_SUFFIX=-glue-2k \
    SHAPES_LIMIT=${SHAPES_LIMIT:-150}; source scripts/device/decode-ab.sh ) || rc=1
exit ${rc:-0}
