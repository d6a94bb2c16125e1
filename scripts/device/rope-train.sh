# The training RoPE (kernels/rope.py under autograd: one launch forward, one backward): the
# compiled GPU checks of tests/kernels/test_rope.py (inference and training: forward and gradient
# bit-equal to autograd through rope_ref at Moonlight's B 1 x S 4096 x 16 heads, V3's 128 heads,
# odd shapes, the shared rope key), then `moeray bench kernels --only rope_train` (q's rope part
# and the rope key at Moonlight's training shape, kernel vs autograd through the reference:
# times, kernels each way, bandwidth, bits) and its table. 1 GPU, ~2 minutes. For the end-to-end
# step: scripts/device/run.sh train-1gpu, once as is and once with MOERAY_FUSED_ROPE=0.
gpu_pytest rope_tests.log ${ROPE_TEST_LIMIT:-180} tests/kernels/test_rope.py -m gpu || rc=1
grep "RESULT\|MISMATCH" "$OUT/rope_tests.log" | cut -c1-200
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${ROPE_BENCH_LIMIT:-180} python3 -m moeray.cli bench kernels --only rope_train --tag rope-train > "$OUT/rope_train_bench.log" 2>&1 || rc=1
el "bench kernels --only rope_train rc=${rc:-0}"
grep "^rope_train \|failed\|Error" "$OUT/rope_train_bench.log" | cut -c1-300
cp benchmarks/results/kernels-*-rope-train.json "$OUT/" 2>/dev/null
exit ${rc:-0}
