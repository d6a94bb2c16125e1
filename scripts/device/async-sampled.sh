# Async scheduling for sampled requests (EngineConfig.async_scheduling_sampled, default on) checked
# and timed in one call (1 GPU, ~6 minutes): the async GPU tests (greedy and seeded sampled tokens
# equal to the synchronous engine's, a sampled step returning before its forward ends), then the
# engine shapes decoding at temperature 1.0 without and with it (TAG_SUFFIX -t1 / -t1-async).
# It won at every batch on the H200 (benchmarks/notes-engine.md) and is the default since.
gpu_pytest pytest_async.log ${ASYNC_TEST_LIMIT:-150} tests/gpu/test_async_scheduling_gpu.py || rc=1
for mode in 0 1; do
  tag=$([ $mode = 1 ] && echo -t1-async || echo -t1)
  ( export TEMP=1.0 ASYNC_SAMPLED=$mode TAG_SUFFIX=$tag PROFILE_STEPS=${PROFILE_STEPS:-2}
    source scripts/device/engine-shapes.sh ) || rc=1
done
exit ${rc:-0}
