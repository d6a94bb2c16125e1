# moe_gemv's sum folded into its down kernel (MOERAY_FUSED_MOE_SUM_FOLD, the default since this
# recipe measured it: benchmarks/notes-engine.md) checked and timed in one call (1 GPU, ~6
# minutes): the moe_gemv GPU tests (the fold's bits against the three-launch path, eager and in a
# CUDA graph, at Moonlight's and V3's experts) and the fused MoE at real widths (its
# 350-rows-an-expert case runs FP8's 128x128 prefill tile), then Moonlight bf16 and FP8 at batch 1
# and 8 without and with the fold (TAG_SUFFIX -nofold / -fold).
gpu_pytest pytest_moe_fold.log ${FOLD_TEST_LIMIT:-200} tests/gpu/test_moe_gemv_gpu.py \
  tests/gpu/test_kernels_gpu.py -k "moe_gemv or fold or fused_moe_real_width" || rc=1
for mode in 0 1; do
  tag=$([ $mode = 1 ] && echo -fold || echo -nofold)
  ( export MOERAY_FUSED_MOE_SUM_FOLD=$mode SHAPES=moonlight BATCHES=${BATCHES:-1,8} TAG_SUFFIX=$tag
    export PROFILE_STEPS=${PROFILE_STEPS:-2}; source scripts/device/engine-shapes.sh ) || rc=1
done
exit ${rc:-0}
