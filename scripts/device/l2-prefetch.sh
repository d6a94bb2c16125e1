# Weights fetched into L2 at each decode layer's start (MOERAY_FUSED_L2_PREFETCH=1, opt-in;
# model/prefetch.py, kernels/l2_prefetch.py) checked and timed in one call (1 GPU, ~7 minutes):
# the GPU tests (every mode eager and in a graph, bytes unchanged, TOUCH's sums; the Moonlight
# plan; the bench timers' test), `moeray bench kernels --only l2_prefetch` (a gemv's time after a
# flush with and without each mode, 0 and 20 us of idle before it), then Moonlight bf16 and FP8
# at batch 1 and 8 without and with it, per VARIANTS entry ("off" or MODE:MB; TAG_SUFFIX
# -l2off / -l2<mode><MB>). Turn it on by default (`PrefetchSettings.from_env`) with the winning
# mode and budget if it wins at batch 1.
gpu_pytest pytest_l2.log ${L2_TEST_LIMIT:-150} tests/gpu/test_l2_prefetch_gpu.py \
  tests/gpu/test_bench_timers_gpu.py || rc=1
CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${L2_BENCH_LIMIT:-120} python3 -m moeray.cli bench kernels \
  --only l2_prefetch --tag l2-prefetch > "$OUT/l2_bench.log" 2>&1 || rc=1
el "bench kernels l2_prefetch rc=${rc:-0}"
grep "^l2_prefetch\|Error\|error" "$OUT/l2_bench.log" | cut -c1-170
cp benchmarks/results/kernels-*-l2-prefetch.json "$OUT/" 2>/dev/null
for v in ${VARIANTS:-off LINES:32 BULK:32 LINES:48}; do
  if [ "$v" = off ]; then
    envs="MOERAY_FUSED_L2_PREFETCH=0" tag=-l2off
  else
    envs="MOERAY_FUSED_L2_PREFETCH=1 MOERAY_L2_PREFETCH_MODE=${v%%:*} MOERAY_L2_PREFETCH_MB=${v##*:}"
    tag=-l2$(echo ${v%%:*} | tr A-Z a-z)${v##*:}
  fi
  ( export $envs SHAPES=moonlight BATCHES=${BATCHES:-1,8} TAG_SUFFIX=$tag
    export PROFILE_STEPS=${PROFILE_STEPS:-2}; source scripts/device/engine-shapes.sh ) || rc=1
done
exit ${rc:-0}
