# Launches cut from a MoE layer at decode batches past 16 tokens: ALIGN_QUANT (x's act_quant in
# moe_align's launch), SHARED_SUM (the side stream's shared output added in the routed sum's
# launch), NORM_ROUTER_WIDE (the post-attention norm folded into the router at 33-64 rows), the
# default since the twenty-sixth session, and MOE_H128 (opt-in: gate/up in 128-column tiles
# quantizing h in their epilogue). Their GPU tests (bit-equal to the launches they replace; the
# fold's numbers), then `bench engine --ab` flipping each at Moonlight FP8 batch 32 and 64, then
# all four (1 GPU, ~3 minutes at BATCHES=64; Ray is not needed). A switch is the default where it
# wins past the as_run_again spread.
gpu_pytest pytest_moe_launches.log ${TEST_LIMIT:-120} \
  tests/gpu/test_kernels_gpu.py::test_fp8_gate_up_quantizes_h_itself_at_real_widths \
  tests/gpu/test_kernels_gpu.py::test_moe_align_quant_real_shapes \
  tests/gpu/test_shared_stream_gpu.py::test_same_bits_as_in_order_eager_and_graphed || rc=1
# apart: tests/kernels sets TRITON_INTERPRET=1 for its process, which tests/gpu refuses
gpu_pytest pytest_norm_router.log 100 \
  tests/kernels/test_norm_router.py::test_norm_router_logits_compiled_on_gpu || rc=1
( export WEIGHTS=fp8 AB=${AB:-MOE_H128,ALIGN_QUANT,SHARED_SUM,NORM_ROUTER_WIDE,MOE_H128+ALIGN_QUANT+SHARED_SUM+NORM_ROUTER_WIDE}
  export BATCHES=${BATCHES:-32,64}
  export TAG_SUFFIX=${TAG_SUFFIX:--moelaunches} SHAPES_LIMIT=${SHAPES_LIMIT:-400}
  source scripts/device/decode-ab.sh ) || rc=1
exit ${rc:-0}
