# The MoE token permute and weighted combine of training (kernels/moe_permute.py under autograd):
# the compiled GPU check of tests/kernels/test_moe_permute.py (forward bits of the references,
# dy and dx exact, dw within its dot product's bound, at Moonlight's T 4096 x top-6 x D 2048, V3's
# width and odd shapes), then `moeray bench kernels --only moe_permute_train` (permute and combine
# against the PyTorch ops of Experts._routed: times, kernels each way, bandwidth, the saving per
# step) and its table. 1 GPU, ~2 minutes. For the end-to-end step: scripts/device/run.sh
# train-1gpu, once as is and once with MOERAY_FUSED_MOE_COMBINE=0.
gpu_pytest moe_permute_tests.log ${MOE_PERMUTE_TEST_LIMIT:-180} tests/kernels/test_moe_permute.py -m gpu || rc=1
grep "RESULT\|MISMATCH" "$OUT/moe_permute_tests.log" | cut -c1-200
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${MOE_PERMUTE_BENCH_LIMIT:-180} python3 -m moeray.cli bench kernels --only moe_permute_train --tag moe-permute > "$OUT/moe_permute_bench.log" 2>&1 || rc=1
el "bench kernels --only moe_permute_train rc=${rc:-0}"
grep "^moe_permute_train \|failed\|Error" "$OUT/moe_permute_bench.log" | cut -c1-300
cp benchmarks/results/kernels-*-moe-permute.json "$OUT/" 2>/dev/null
exit ${rc:-0}
