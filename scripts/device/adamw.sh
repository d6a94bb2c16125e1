# The fused AdamW (kernels/adamw.py, bf16 or fp32 moments, one launch per parameter group): its
# compiled GPU check (odd sizes and Moonlight shapes against the reference on CUDA, bf16 and fp32
# moments, bf16 gradients, grad_scale, no host sync inside; ShardedAdamW's kernel path against
# its loop with MOERAY_FUSED_ADAMW=0; a timing against torch's fused AdamW), then `moeray bench
# kernels --only adamw` (one Moonlight MoE layer's 0.585B parameters: the kernel with bf16 and
# fp32 moments, the per-parameter loop, torch's fused fp32 AdamW, 8 configs) and its table.
# 1 GPU, ~3 minutes. For the end-to-end step: MOMENTS=bfloat16 scripts/device/run.sh train-1gpu.
gpu_pytest adamw_tests.log ${ADAMW_TEST_LIMIT:-180} tests/kernels/test_adamw.py -m gpu || rc=1
grep "^moments \|^ShardedAdamW\|B params" "$OUT/adamw_tests.log" | cut -c1-230
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${ADAMW_BENCH_LIMIT:-240} python3 -m moeray.cli bench kernels --only adamw --tag adamw > "$OUT/adamw_bench.log" 2>&1 || rc=1
el "bench kernels --only adamw rc=${rc:-0}"
grep "^adamw\|failed\|Error" "$OUT/adamw_bench.log" | cut -c1-300
cp benchmarks/results/kernels-*-adamw.json "$OUT/" 2>/dev/null
exit ${rc:-0}
