# Async scheduling through admissions (EngineConfig.async_scheduling_prefill, opt-in): the async
# GPU tests (the admissions test among them), then `moeray bench engine --arrivals` at the Moonlight
# shape: ARRIVALS (default 64) requests of 128-token prompts and 32 output tokens, one every
# EVERY (default 2) step calls, at most BATCH (default 16) running, timed without async scheduling
# (sync), then with the setting off and on, on the same weights (engine.arrivals in
# engine-<gpu>-moonlight-<w>-arrivals.json: tokens/s, drains, on_vs_off, on_vs_sync, and
# on_equals_sync: 1.0 unless the step launched ahead computes something the synchronous one does
# not). Each arm first runs the same arrivals on other prompts untimed (compiles, graphs).
# 1 GPU, ~4 minutes.
gpu_pytest pytest_async.log ${ASYNC_TEST_LIMIT:-150} tests/gpu/test_async_scheduling_gpu.py || rc=1
for w in ${WEIGHTS:-fp8 bf16}; do
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SHAPES_LIMIT:-150} python3 -m moeray.cli bench engine \
    --preset moonlight_16b_a3b --weights "$w" --mtp-train-steps 0 --batch-sizes ${BATCH:-16} \
    --skip prefill,router-ab,hf,mtp --arrivals ${ARRIVALS:-64} --arrival-every ${EVERY:-2} \
    --tag "moonlight-$w-arrivals" --out-dir "$OUT" > "$OUT/engine-moonlight-$w-arrivals.log" 2>&1
  r=$?; [ $r -eq 0 ] || rc=1
  el "bench engine arrivals $w rc=$r"; grep "^arrivals\|Error" "$OUT/engine-moonlight-$w-arrivals.log" | cut -c1-200
done
exit ${rc:-0}
