# Decode defaults checked in one call (1 GPU, ~8 minutes): the engine GPU tests with async
# scheduling on by default (tiny engine, MTP, sampling, merged projections, async), fp8_gemv's
# batch-1 split sweep at Moonlight's projections (`bench kernels --only fp8_gemv_split_sweep`:
# tile x split-K against the bf16 gemv on the same shape), then the engine shapes with PDL off
# (TAG_SUFFIX -pdloff; the PDL-on runs of the same code are async-ab's -async files).
gpu_pytest pytest_engine.log ${TEST_LIMIT:-170} tests/gpu/test_tiny_engine_gpu.py \
  tests/gpu/test_async_scheduling_gpu.py tests/gpu/test_engine_mtp_gpu.py \
  tests/gpu/test_sampling_gpu.py tests/gpu/test_merge_projections_gpu.py || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SWEEP_LIMIT:-240} python3 -m moeray.cli bench kernels \
  --only fp8_gemv_split_sweep --tag fp8-gemv-splits > "$OUT/split_sweep.log" 2>&1 || rc=1
el "fp8_gemv split sweep"; grep "split sweep" "$OUT/split_sweep.log" | cut -c1-200
cp benchmarks/results/kernels-*-fp8-gemv-splits.json "$OUT"/ 2>/dev/null
( export MOERAY_FUSED_PDL=0 TAG_SUFFIX=-pdloff PROFILE_STEPS=${PROFILE_STEPS:-2}
  source scripts/device/engine-shapes.sh ) || rc=1
exit ${rc:-0}
