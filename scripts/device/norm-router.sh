# The post-attention add + RMSNorm folded into the router's logits kernel (MOERAY_FUSED_NORM_ROUTER,
# the default since this recipe measured it: kernels/norm_router.py) checked and timed in one call
# (1 GPU, ~4 minutes on an H100): its compiled
# check at Moonlight / V3 widths and odd shapes, the tiny engine's greedy tokens with it in the
# captured graphs, then `bench engine --ab NORM_ROUTER` (each engine built without and with it in
# one run) at Moonlight bf16 and FP8, batch 1 and 8, and V3 widths FP8 at batch 1 and 64.
# (tests/kernels runs the interpreter in its process: the engine test in a pytest of its own)
gpu_pytest pytest_norm_router.log 90 tests/kernels/test_norm_router.py -m gpu || rc=1
gpu_pytest pytest_norm_folded.log 120 tests/gpu/test_tiny_engine_gpu.py -k norm_folded || rc=1
( export SHAPES=moonlight BATCHES=${BATCHES:-1,8} AB=NORM_ROUTER TAG_SUFFIX=-normrouter
  export SHAPES_LIMIT=${SHAPES_LIMIT:-170} PROFILE_STEPS=${PROFILE_STEPS:-4}
  source scripts/device/engine-shapes.sh ) || rc=1
( export SHAPES=v3 WEIGHTS=fp8 AB=NORM_ROUTER TAG_SUFFIX=-normrouter
  export SHAPES_LIMIT=${SHAPES_LIMIT:-170} PROFILE_STEPS=${PROFILE_STEPS:-4}
  source scripts/device/engine-shapes.sh ) || rc=1
exit ${rc:-0}
