# Prefill chunks replayed from CUDA graphs (EngineConfig.prefill_graph_tokens, engine/
# step_graphs.py): the tiny engine's GPU test (16-256-token buckets captured, greedy tokens equal
# to the eager engine's), then `moeray bench engine --arrivals` at the Moonlight shape: ARRIVALS
# (default 48) requests of 128-token prompts and 32 output tokens, one every EVERY (default 2)
# step calls, at most BATCH (default 16) running; every run with chunk graphs up to GRAPH_TOKENS
# (default 256), and two synchronous runs with eager chunks (expanded, absorbed MLA) to compare:
# sync_vs_eager, sync_equals_absorbed (1.0: the graphs compute the eager absorbed chunks'
# tokens), sync_equals_eager, and the step times split (engine.arrivals in
# engine-<gpu>-moonlight-<w>-chunkgraphs.json).
# 1 GPU, ~5 minutes a weights.
gpu_pytest pytest_chunk.log ${CHUNK_TEST_LIMIT:-150} tests/gpu/test_tiny_engine_gpu.py \
  -k "chunk_graphs or decode_graphs_capture" || rc=1
grep -h "^FAILED\|^E  " "$OUT/pytest_chunk.log" | cut -c1-200 | head -12
for w in ${WEIGHTS:-fp8}; do
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 ${SHAPES_LIMIT:-300} python3 -m moeray.cli bench engine \
    --preset moonlight_16b_a3b --weights "$w" --mtp-train-steps 0 --batch-sizes ${BATCH:-16} \
    --skip prefill,router-ab,hf,mtp --arrivals ${ARRIVALS:-48} --arrival-every ${EVERY:-2} \
    --arrival-graph-tokens ${GRAPH_TOKENS:-256} --tag "moonlight-$w-chunkgraphs" --out-dir "$OUT" \
    > "$OUT/engine-moonlight-$w-chunkgraphs.log" 2>&1
  r=$?; [ $r -eq 0 ] || rc=1
  el "bench engine arrivals $w rc=$r"
  grep "^arrivals\|^sync\|^eager\|Error\|not captured" "$OUT/engine-moonlight-$w-chunkgraphs.log" | cut -c1-240
done
exit ${rc:-0}
