# The fused cross-entropy (kernels/cross_entropy.py): its GPU tests (odd shapes compiled; T=4096 at
# V=163,840 and 129,280 against the fp32 reference, loss, bf16 grads within one step, peak memory;
# a tiny training step with MTP against MOERAY_FUSED_CROSS_ENTROPY=0), then `moeray bench kernels
# --only cross_entropy` (fused in place / to a new grad vs torch, kernels, peak memory, fraction
# of the bandwidth floor) and its table. 1 GPU, ~2 minutes.
gpu_pytest cross_entropy_tests.log ${CE_TEST_LIMIT:-180} tests/gpu/test_cross_entropy_gpu.py || rc=1
grep "extra peak" "$OUT/cross_entropy_tests.log" | cut -c1-200
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${CE_BENCH_LIMIT:-180} python3 -m moeray.cli bench kernels --only cross_entropy --tag cross-entropy > "$OUT/cross_entropy_bench.log" 2>&1 || rc=1
el "bench kernels --only cross_entropy rc=${rc:-0}"
grep "^cross_entropy \|failed\|Error" "$OUT/cross_entropy_bench.log" | cut -c1-300
cp benchmarks/results/kernels-*-cross-entropy.json "$OUT/" 2>/dev/null
exit ${rc:-0}
