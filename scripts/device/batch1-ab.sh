# The batch-1 opt-in switches (FP8_GEMV_WIDE, GEMV_WIDE, MOE_DOWN_EARLY, MLA_WUV) timed against the
# shipped engine in one run each at the Moonlight shape (`bench engine --ab`, batch 1 only: none
# of them changes a launch past 4 rows), FP8 then bf16, then the GPU tests of their kernels and of
# the engine paths they touch (GPU_LIMIT seconds, default 200). 1 GPU, ~9 minutes. Results
# engine-<gpu>-moonlight-<w>-b1ab.json (engine.ab), the A/B tables in the log.
export BATCHES=1 PROFILE_STEPS=${PROFILE_STEPS:-4} SHAPES_LIMIT=${SHAPES_LIMIT:-200}
export TAG_SUFFIX=${TAG_SUFFIX:--b1ab}
( export WEIGHTS=fp8 AB=FP8_GEMV_WIDE,MOE_DOWN_EARLY,MLA_WUV; source scripts/device/decode-ab.sh ) || rc=1
( export WEIGHTS=bf16 AB=GEMV_WIDE,MOE_DOWN_EARLY,MLA_WUV; source scripts/device/decode-ab.sh ) || rc=1
gpu_pytest pytest_gpu.log "${GPU_LIMIT:-200}" tests/gpu/test_fp8_gemv_gpu.py tests/gpu/test_pdl_gpu.py \
  tests/gpu/test_mla_merge_gpu.py tests/gpu/test_moe_gemv_gpu.py tests/gpu/test_shared_fuse_gpu.py \
  tests/gpu/test_merge_projections_gpu.py tests/gpu/test_tiny_engine_gpu.py || rc=1
grep -h "^FAILED\|^ERROR" "$OUT/pytest_gpu.log" | cut -c1-200 | head -20
exit ${rc:-0}
