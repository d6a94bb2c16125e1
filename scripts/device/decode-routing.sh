# The router's opt-in paths checked and timed in one call (1 GPU, ~6 minutes): the fused kernels
# at decode batches to 256 (MOERAY_FUSED_ROUTE_BATCH=1: router logits as cuBLAS's fp32-output GEMM
# and the fused gate past 32 tokens; kernels/common.py) and the logits + gate folded into one
# launch at 1-8 tokens (MOERAY_FUSED_ROUTE_FOLD=1, kernels/router_gate.py). Their GPU tests, then
# Moonlight bf16 and FP8 at batch 1 and 64 as shipped (TAG_SUFFIX -shipped), at batch 64 with the
# batch routing (-routebatch) and at batch 1 with the fold (-routefold). SHAPES="moonlight v3"
# adds the V3 widths (past 600 s: run it as its own call). Make each the default where it wins
# (ROUTE_BATCH: gate.FUSED_MAX_TOKENS and router_logits.MAX_TOKENS to
# common.ROUTE_BATCH_MAX_TOKENS; ROUTE_FOLD: `router_gate_applies` without the switch).
gpu_pytest pytest_routing.log ${TEST_LIMIT:-150} tests/kernels/test_router_logits.py tests/kernels/test_gate.py tests/kernels/test_router_gate.py -m gpu || rc=1
export SHAPES="${SHAPES:-moonlight}" PROFILE_STEPS=${PROFILE_STEPS:-2}
( export BATCHES=1,64 TAG_SUFFIX=-shipped; source scripts/device/engine-shapes.sh ) || rc=1
( export MOERAY_FUSED_ROUTE_BATCH=1 BATCHES=64 TAG_SUFFIX=-routebatch
  source scripts/device/engine-shapes.sh ) || rc=1
( export MOERAY_FUSED_ROUTE_FOLD=1 BATCHES=1 TAG_SUFFIX=-routefold
  source scripts/device/engine-shapes.sh ) || rc=1
exit ${rc:-0}
