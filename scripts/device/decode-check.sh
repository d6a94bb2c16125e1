# The decode path's defaults checked and timed in one call (1 GPU, ~9 minutes; the engine tests
# alone ran past 200 s): GPU tests of the engine under async scheduling (tiny engine, async incl.
# sampled, MTP, sampling, merged projections, PDL) and of fp8_gemv (its batch-1 tile), then the
# engine shapes as shipped. BENCH=1 adds `bench kernels --only fp8_gemv` (V3's linear shapes at
# M = 1, 8, 64; ~90 s).
gpu_pytest pytest_engine.log ${TEST_LIMIT:-320} tests/gpu/test_tiny_engine_gpu.py \
  tests/gpu/test_async_scheduling_gpu.py tests/gpu/test_engine_mtp_gpu.py \
  tests/gpu/test_sampling_gpu.py tests/gpu/test_merge_projections_gpu.py \
  tests/gpu/test_pdl_gpu.py || rc=1
gpu_pytest pytest_fp8_gemv.log ${GEMV_TEST_LIMIT:-120} tests/gpu/test_fp8_gemv_gpu.py || rc=1
( export PROFILE_STEPS=${PROFILE_STEPS:-2}; source scripts/device/engine-shapes.sh ) || rc=1
if [ "${BENCH:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${BENCH_LIMIT:-90} python3 -m moeray.cli bench kernels \
    --only fp8_gemv --tag fp8-gemv-m1 > "$OUT/fp8_gemv_bench.log" 2>&1 || rc=1
  el "bench kernels --only fp8_gemv"; grep -A25 "fp8_gemv layer" "$OUT/fp8_gemv_bench.log" | cut -c1-120
  cp benchmarks/results/kernels-*-fp8-gemv-m1.json "$OUT"/ 2>/dev/null
fi
exit ${rc:-0}
