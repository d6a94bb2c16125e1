# Two opt-in decode paths checked and timed in one call (1 GPU, ~7 minutes): the router's fused
# kernels at decode batches to 256 (MOERAY_FUSED_ROUTE_BATCH=1: router logits' tiled kernel and the
# fused gate past 32 tokens; kernels/common.py) and MLA decode's merge folded into its split
# kernel (MOERAY_FUSED_MLA_DIRECT=1, kernels/mla_decode.py). Their GPU tests, then Moonlight bf16
# and FP8 at batch 1 and 64 as shipped (TAG_SUFFIX -shipped), with MLA direct (-mladirect), and
# at batch 64 with the batch routing (-routebatch). SHAPES="moonlight v3" adds the V3 widths.
# Make each the default where it wins (ROUTE_BATCH: gate.FUSED_MAX_TOKENS and
# router_logits.MAX_TOKENS to common.ROUTE_BATCH_MAX_TOKENS).
gpu_pytest pytest_routing.log ${TEST_LIMIT:-150} tests/kernels/test_router_logits.py tests/kernels/test_gate.py -m gpu || rc=1
gpu_pytest pytest_mla_direct.log ${TEST_LIMIT:-150} tests/gpu/test_kernels_gpu.py -k "mla_decode" || rc=1
export SHAPES="${SHAPES:-moonlight}" PROFILE_STEPS=${PROFILE_STEPS:-2}
( export BATCHES=${BATCHES:-1,64} TAG_SUFFIX=-shipped; source scripts/device/engine-shapes.sh ) || rc=1
( export MOERAY_FUSED_MLA_DIRECT=1 BATCHES=${BATCHES:-1,64} TAG_SUFFIX=-mladirect
  source scripts/device/engine-shapes.sh ) || rc=1
( export MOERAY_FUSED_ROUTE_BATCH=1 BATCHES=64 TAG_SUFFIX=-routebatch
  source scripts/device/engine-shapes.sh ) || rc=1
exit ${rc:-0}
