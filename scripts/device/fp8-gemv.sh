# fp8_gemv (weight-only FP8 GEMM for decode): its GPU tests (V3 and ragged shapes, CUDA graph,
# FP8Linear's kernel choice), the kept-FP8 model checks that run FP8Linear through it, then
# `moeray bench kernels --only fp8_gemv` (V3 linear shapes x M = 1, 8, 64 against act_quant +
# fp8_gemm and bf16 F.linear, all from CUDA graphs), a tile sweep, and their tables.
# 1 GPU, ~3 minutes.
gpu_pytest pytest_fp8_gemv.log ${GEMV_TEST_LIMIT:-200} tests/gpu/test_fp8_gemv_gpu.py tests/gpu/test_fp8_kv_cache_gpu.py || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${GEMV_BENCH_LIMIT:-200} python3 -m moeray.cli bench kernels --only fp8_gemv,fp8_gemv_sweep --tag fp8-gemv > "$OUT/fp8_gemv_bench.log" 2>&1 || rc=1
el "bench kernels --only fp8_gemv rc=${rc:-0}"
sed -n '/^fp8_gemv layer/,/^wrote/p' "$OUT/fp8_gemv_bench.log" | grep -v '^issue 4\|^$' | cut -c1-170
grep "failed\|Error" "$OUT/fp8_gemv_bench.log" | head -5
cp benchmarks/results/kernels-*-fp8-gemv.json "$OUT/" 2>/dev/null
exit ${rc:-0}
