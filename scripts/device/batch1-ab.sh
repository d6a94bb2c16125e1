# The batch-1 switches (FP8_GEMV_WIDE, MOE_DOWN_EARLY opt-in; MLA_WUV, MLA_WUK,
# FP8_GEMV_ONE_STEP) timed against the shipped engine in one run each at the Moonlight shape (`bench
# engine --ab`, batch 1 only: none of them changes a launch past 4 rows), for each of B1_WEIGHTS
# (default "fp8 bf16"), then the GPU tests of their kernels and of the engine paths they touch
# (GPU_TESTS, GPU_LIMIT seconds, default 200; the whole list takes longer: 150 s reached
# test_pdl_gpu.py). 1 GPU: each weights' A/B took ~1 minute on an H100, compiles included. Results
# engine-<gpu>-moonlight-<w>-b1ab.json (engine.ab), the A/B tables in the log.
export BATCHES=1 PROFILE_STEPS=${PROFILE_STEPS:-4} SHAPES_LIMIT=${SHAPES_LIMIT:-240}
export TAG_SUFFIX=${TAG_SUFFIX:--b1ab}
declare -A SWITCHES_OF=(
  [fp8]=FP8_GEMV_ONE_STEP,FP8_GEMV_WIDE,MOE_DOWN_EARLY,MLA_WUV,MLA_WUK
  [bf16]=MOE_DOWN_EARLY,MLA_WUV,MLA_WUK
)
for w in ${B1_WEIGHTS:-fp8 bf16}; do
  ( export WEIGHTS=$w AB=${SWITCHES_OF[$w]}; source scripts/device/decode-ab.sh ) || rc=1
done
GPU_TESTS=${GPU_TESTS:-tests/gpu/test_fp8_gemv_gpu.py tests/gpu/test_pdl_gpu.py \
  tests/gpu/test_mla_merge_gpu.py tests/gpu/test_mla_write_absorb_gpu.py \
  tests/gpu/test_moe_gemv_gpu.py tests/gpu/test_shared_fuse_gpu.py \
  tests/gpu/test_merge_projections_gpu.py tests/gpu/test_tiny_engine_gpu.py}
# shellcheck disable=SC2086  # GPU_TESTS is a list of paths
gpu_pytest pytest_gpu.log "${GPU_LIMIT:-200}" $GPU_TESTS || rc=1
grep -h "^FAILED\|^ERROR" "$OUT/pytest_gpu.log" | cut -c1-200 | head -20
exit ${rc:-0}
