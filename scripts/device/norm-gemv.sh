# The decoder layer's input add + RMSNorm folded into the merged q / kv_a GEMV's prologue
# (MOERAY_FUSED_NORM_GEMV, opt-in: kernels/prenorm.py, gemv.norm_gemv, fp8/norm_gemv.py) checked and
# timed in one call (1 GPU, ~5 minutes on an H100): the compiled checks at Moonlight / V3 widths
# and odd shapes, the tiny engine's greedy tokens with it in the captured graphs, then `bench
# engine --ab NORM_GEMV` at Moonlight bf16 and FP8, batch 1 and 8, and V3 widths FP8 at 1 and 64.
# (tests/kernels runs the interpreter in its process: the engine test in a pytest of its own)
gpu_pytest pytest_norm_gemv.log 120 tests/kernels/test_norm_gemv.py -m gpu || rc=1
gpu_pytest pytest_norm_gemv_engine.log 120 tests/gpu/test_tiny_engine_gpu.py -k "input_norm_folded" || rc=1
( export SHAPES=moonlight BATCHES=${BATCHES:-1,8} AB=NORM_GEMV TAG_SUFFIX=-normgemv
  export SHAPES_LIMIT=${SHAPES_LIMIT:-170} PROFILE_STEPS=${PROFILE_STEPS:-4}
  source scripts/device/engine-shapes.sh ) || rc=1
( export SHAPES=v3 WEIGHTS=fp8 AB=NORM_GEMV TAG_SUFFIX=-normgemv
  export SHAPES_LIMIT=${SHAPES_LIMIT:-170} PROFILE_STEPS=${PROFILE_STEPS:-4}
  source scripts/device/engine-shapes.sh ) || rc=1
exit ${rc:-0}
