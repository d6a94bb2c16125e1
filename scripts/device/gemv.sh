# gemv (bf16 weight-only GEMV for decode): its GPU tests (Moonlight and V3 decode shapes, one
# launch at M = 1, CUDA graph, tiny engine greedy tokens with and without MOERAY_FUSED_GEMV) and
# fp8_gemv's, then `moeray bench kernels --only gemv,fp8_gemv,gemv_sweep` (M = 1, 2, 4, 8 against
# cuBLAS F.linear; a tile sweep of ~50 s) and their tables. 1 GPU, ~5 minutes.
gpu_pytest pytest_gemv.log ${GEMV_TEST_LIMIT:-110} tests/gpu/test_gemv_gpu.py tests/gpu/test_fp8_gemv_gpu.py || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${GEMV_BENCH_LIMIT:-240} python3 -m moeray.cli bench kernels --only gemv,fp8_gemv,gemv_sweep --tag gemv > "$OUT/gemv_bench.log" 2>&1 || rc=1
el "bench kernels --only gemv,fp8_gemv,gemv_sweep rc=${rc:-0}"
sed -n '/^fp8_gemv layer/,/^wrote/p' "$OUT/gemv_bench.log" | grep -v '^issue 4\|^$' | cut -c1-170
grep "failed\|Error\|budget" "$OUT/gemv_bench.log" | head -5
cp benchmarks/results/kernels-*-gemv.json "$OUT/" 2>/dev/null
exit ${rc:-0}
