# Fused MoE prefill tiles and MLA decode under CUDA graphs (1 GPU, ~5 minutes): the GPU tests
# of both kernels (real widths, FP8 and bf16; MLA real shapes), then `moeray bench kernels --only
# fused_moe,fused_moe_prefill_sweep,mla_decode_graph`: the shipped fused MoE against the
# per-expert loop (decode T64, prefill T8192; also against the loop's kernels alone, `device_ms`:
# the loop is host-bound), the prefill tile sweep (each tile's speedup over the loop in the same
# run) and MLA decode under CUDA graphs (128 heads: TFLOP/s). `_moe_config` is tuned from the
# sweep. (A 128-head sweep of shorter loop steps and lazy rescaling, both slower, is in
# benchmarks/notes-kernels.md.)
gpu_pytest pytest_moe_mla.log ${MOE_MLA_TEST_LIMIT:-150} tests/gpu/test_kernels_gpu.py \
  tests/gpu/test_bench_timers_gpu.py -k "fused_moe or mla_decode or moonlight_moe or device_ms" || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${PREFILL_MLA_LIMIT:-300} python3 -m moeray.cli bench kernels \
  --only ${SECTIONS:-fused_moe,fused_moe_prefill_sweep,mla_decode_graph} --tag ${TAG:-prefill-mla} \
  > "$OUT/prefill_mla.log" 2>&1 || rc=1
el "bench kernels prefill-mla rc=${rc:-0}"
grep "^fused_moe\|^  bf16\|^  fp8 \|^mla_decode\|failed\|Error" "$OUT/prefill_mla.log" | cut -c1-170
cp benchmarks/results/kernels-*-${TAG:-prefill-mla}.json "$OUT/" 2>/dev/null
exit ${rc:-0}
