# The GPU tests of the decode fast paths that went through decode-ab, and of every opt-in one, in
# one call (1 GPU, ~6 minutes): the router kernels at decode batches (ROUTE_BATCH), MLA decode at
# real shapes, fp8_gemv to 64 rows (FP8_GEMV_BATCH, opt-in), head_gemv (HEAD_GEMV, opt-in), small
# FP8 layers as bf16 at 9-64 rows (FP8_AS_BF16), greedy's argmax (ARGMAX, opt-in), moe_gemv's
# shared slots before its PDL wait (SHARED_EARLY), MLA's per-head products as one bmm (HEAD_BMM,
# the default at 2+ rows). A switch becomes the default only with its tests passed here and a
# win in recipe decode-ab.
gpu_pytest pytest_opt_in_routing.log ${TEST_LIMIT:-150} tests/kernels/test_router_logits.py \
  tests/kernels/test_gate.py -m gpu || rc=1
gpu_pytest pytest_opt_in_gpu.log ${GPU_TEST_LIMIT:-150} tests/gpu/test_kernels_gpu.py \
  tests/gpu/test_fp8_gemv_gpu.py tests/gpu/test_head_gemv_gpu.py \
  -k "mla_decode or batch_switch or as_bf16 or head_gemv or head_bmm" || rc=1
gpu_pytest pytest_opt_in_argmax.log ${ARGMAX_TEST_LIMIT:-120} tests/gpu/test_sampling_gpu.py \
  -k argmax || rc=1
gpu_pytest pytest_opt_in_early.log ${EARLY_TEST_LIMIT:-150} tests/gpu/test_moe_gemv_gpu.py \
  tests/gpu/test_shared_fuse_gpu.py -k early || rc=1
exit ${rc:-0}
