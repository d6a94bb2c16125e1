# Async scheduling (engine/overlap.py, EngineConfig.async_scheduling, on by default on CUDA)
# checked and timed in one call (1 GPU, ~7 minutes): its GPU tests (greedy tokens equal to the synchronous engine's
# under CUDA graphs at batch 1 and 4, steps launched ahead, a step returning before its forward
# ends), then the engine shapes with and without it (TAG_SUFFIX -sync / -async, PROFILE_STEPS 2):
# decode tok/s, decode_graph_ms and host phases side by side.
gpu_pytest pytest_async.log ${ASYNC_TEST_LIMIT:-150} tests/gpu/test_async_scheduling_gpu.py || rc=1
for mode in 0 1; do
  tag=$([ $mode = 1 ] && echo -async || echo -sync)
  ( export ASYNC=$mode TAG_SUFFIX=$tag PROFILE_STEPS=${PROFILE_STEPS:-2}
    source scripts/device/engine-shapes.sh ) || rc=1
done
exit ${rc:-0}
